"""Parity with ``torch.nn.LSTM``: forward results and every gradient, float64 and float32.

Torch receives the same weights through ``load_state_dict`` and, where the case has
lengths, the same batch packed with ``pack_padded_sequence(enforce_sorted=False)`` and
unpacked with ``pad_packed_sequence(total_length=T)``. Without given initial states torch
gets explicit zero states that require grad, so that numlstm's ``d_h0`` and ``d_c0`` for
``hx=None`` are checked too. The module skips as a whole without torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOLERANCE, assert_close
from hypothesis import given
from lstm_cases import (
    Case,
    assert_close_float32,
    cases,
    forward_backward,
    make_arrays,
    zero_states,
)

import numlstm

torch = pytest.importorskip("torch")
rnn_utils = pytest.importorskip("torch.nn.utils.rnn")

# torch falls back from oneDNN to its own kernels for projections, and says so.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
DTYPES = [np.float64, np.float32]


def torch_lstm(case, dtype, state_dict=None):
    lstm = torch.nn.LSTM(
        case.input_size, case.hidden_size, dtype=TORCH_DTYPES[np.dtype(dtype)], **case.lstm_kwargs()
    )
    if state_dict is not None:
        lstm.load_state_dict({name: torch.from_numpy(value) for name, value in state_dict.items()})
    return lstm


def torch_forward(lstm, case, x, hx):
    """Run ``lstm`` on tensors as numlstm runs on arrays: padded steps give zeros."""
    if case.lengths is None:
        return lstm(x, hx)
    packed = rnn_utils.pack_padded_sequence(
        x,
        torch.tensor(case.lengths, dtype=torch.int64),
        batch_first=case.batch_first,
        enforce_sorted=False,
    )
    packed_output, states = lstm(packed, hx)
    output, _ = rnn_utils.pad_packed_sequence(
        packed_output, batch_first=case.batch_first, total_length=case.steps
    )
    return output, states


def torch_results(case, arrays, dtype):
    """Torch's output, final states and every gradient of the loss, as NumPy arrays."""
    lstm = torch_lstm(case, dtype, arrays.params)
    h0, c0 = arrays.hx if case.with_hx else zero_states(case, dtype)
    leaves = {
        name: torch.tensor(a, requires_grad=True)
        for name, a in (("x", arrays.x), ("h0", h0), ("c0", c0))
    }
    output, (h_n, c_n) = torch_forward(lstm, case, leaves["x"], (leaves["h0"], leaves["c0"]))
    loss = (
        (output * torch.from_numpy(arrays.d_output)).sum()
        + (h_n * torch.from_numpy(arrays.d_h_n)).sum()
        + (c_n * torch.from_numpy(arrays.d_c_n)).sum()
    )
    loss.backward()
    results = {"output": output, "h_n": h_n, "c_n": c_n}
    grads = {f"d_{name}": leaf.grad for name, leaf in leaves.items()}
    grads |= {f"d_{name}": p.grad for name, p in lstm.named_parameters()}
    return {name: t.detach().numpy() for name, t in (results | grads).items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@given(case=cases(max_steps=6, max_batch=4, max_size=5, dropout=False))
def test_forward_and_every_gradient_match_torch(case, dtype):
    arrays = make_arrays(case, dtype)
    ours = forward_backward(case, arrays)
    theirs = torch_results(case, arrays, dtype)
    assert list(ours) == list(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == np.dtype(dtype), name
        if np.dtype(dtype) == np.float64:
            assert_close(ours[name], expected, dtype=dtype, name=name)
        else:
            assert_close_float32(ours[name], expected, TOLERANCE[np.dtype(dtype)], name=name)


# (num_layers, bidirectional, proj_size, bias)
ROUND_TRIP_CONFIGS = {
    "single": (1, False, 0, True),
    "bi_proj_2layers": (2, True, 2, True),
    "proj_3layers_no_bias": (3, False, 3, False),
    "bi_3layers_no_bias": (3, True, 0, False),
}


def round_trip_case(config):
    num_layers, bidirectional, proj_size, bias = config
    return Case(
        steps=5,
        batch=3,
        input_size=3,
        hidden_size=4,
        num_layers=num_layers,
        bidirectional=bidirectional,
        proj_size=proj_size,
        bias=bias,
        layout="batch_first",
        lengths=(2, 5, 4),
        with_hx=True,
        dropout=0.0,
        seed=11,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS.values(), ids=ROUND_TRIP_CONFIGS.keys())
def test_state_dict_round_trips_between_numlstm_and_torch(config, dtype):
    """Our state dict loads into torch, torch's into ours, and both give the same results."""
    case = round_trip_case(config)
    arrays = make_arrays(case, dtype)
    dtype_name = np.dtype(dtype).name
    ours = numlstm.LSTM(
        case.input_size, case.hidden_size, dtype=dtype_name, seed=3, **case.lstm_kwargs()
    )
    theirs = torch_lstm(case, dtype, ours.state_dict())  # load_state_dict is strict
    assert list(ours.state_dict()) == list(theirs.state_dict())

    def compare(model, reference):
        output, (h_n, c_n) = model(arrays.x, arrays.hx, case.lengths)
        with torch.no_grad():
            x, hx = torch.from_numpy(arrays.x), tuple(torch.from_numpy(a) for a in arrays.hx)
            t_output, (t_h_n, t_c_n) = torch_forward(reference, case, x, hx)
        assert_close(output, t_output.numpy(), dtype=dtype, name="output")
        assert_close(h_n, t_h_n.numpy(), dtype=dtype, name="h_n")
        assert_close(c_n, t_c_n.numpy(), dtype=dtype, name="c_n")

    compare(ours, theirs)

    # torch -> numlstm: a freshly initialised torch model into a differently seeded one.
    fresh_torch = torch_lstm(case, dtype)
    loaded = numlstm.LSTM(
        case.input_size, case.hidden_size, dtype=dtype_name, seed=4, **case.lstm_kwargs()
    )
    loaded.load_state_dict({k: v.detach().numpy() for k, v in fresh_torch.state_dict().items()})
    for name, value in fresh_torch.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value.numpy(), err_msg=name)
    compare(loaded, fresh_torch)

    # numlstm -> torch -> numlstm gives back the very same arrays.
    back = numlstm.LSTM(
        case.input_size, case.hidden_size, dtype=dtype_name, seed=5, **case.lstm_kwargs()
    )
    back.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], value, err_msg=name)
