"""The cell variants: ``cell="peephole"`` and ``cell="ltm_stm"``.

Their gradients are checked against finite differences with the other cells' in
``test_gradients.py``, and their forward pass against ``reference.py`` (the LTM/STM cell's
NumPy transcription) in ``test_properties.py``. Here: the peephole cell against ONNX's
reference implementation of its LSTM with the ``P`` input, with random weights distinct per
gate (ONNX's own node test uses equal weights for every gate, so a swapped gate or peephole
row would pass it); that the variants differ from the standard cell where they should; and
their parameters and errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOLERANCE, assert_close
from hypothesis import given
from hypothesis import strategies as st
from reference import lstm_forward

import numlstm
from numlstm.params import LSTMSpec
from numlstm.validation import CELLS

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

#: ONNX stacks the gates i, o, f, c; ours are i, f, g, o. Its peephole rows are i, o, f;
#: ours i, f, o.
ONNX_GATE_ROWS = (0, 3, 1, 2)
ONNX_PEEPHOLE_ROWS = (0, 2, 1)


def onnx_peephole_lstm(params, hidden, bidirectional, dtype):
    """One ONNX LSTM node with the ``P`` input, from our one-layer peephole parameters."""
    suffixes = ["_l0", "_l0_reverse"] if bidirectional else ["_l0"]

    def gates(array):
        blocks = np.split(array, 4, axis=0)
        return np.concatenate([blocks[n] for n in ONNX_GATE_ROWS], axis=0)

    weights = {
        "W": np.stack([gates(params[f"weight_ih{s}"]) for s in suffixes]),
        "R": np.stack([gates(params[f"weight_hh{s}"]) for s in suffixes]),
        "B": np.stack(
            [
                np.concatenate([gates(params[f"bias_ih{s}"]), gates(params[f"bias_hh{s}"])])
                for s in suffixes
            ]
        ),
        "P": np.stack(
            [params[f"peephole{s}"][list(ONNX_PEEPHOLE_ROWS)].reshape(-1) for s in suffixes]
        ),
    }
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    directions = len(suffixes)
    node = helper.make_node(
        "LSTM",
        ["X", "W", "R", "B", "", "initial_h", "initial_c", "P"],
        ["Y", "Y_h", "Y_c"],
        hidden_size=hidden,
        direction="bidirectional" if bidirectional else "forward",
    )
    states = [directions, "B", hidden]
    graph = helper.make_graph(
        [node],
        "peephole_lstm",
        [
            helper.make_tensor_value_info("X", tensor_type, ["T", "B", None]),
            helper.make_tensor_value_info("initial_h", tensor_type, states),
            helper.make_tensor_value_info("initial_c", tensor_type, states),
        ],
        [
            helper.make_tensor_value_info("Y", tensor_type, ["T", directions, "B", hidden]),
            helper.make_tensor_value_info("Y_h", tensor_type, states),
            helper.make_tensor_value_info("Y_c", tensor_type, states),
        ],
        [numpy_helper.from_array(array.astype(dtype), name) for name, array in weights.items()],
    )
    opset = helper.make_opsetid("", 17)
    model = helper.make_model(
        graph, opset_imports=[opset], ir_version=helper.find_min_ir_version_for([opset])
    )
    onnx.checker.check_model(model)
    return model


@given(
    steps=st.integers(1, 5),
    batch=st.integers(1, 3),
    input_size=st.integers(1, 4),
    hidden=st.integers(1, 4),
    bidirectional=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_peephole_cell_equals_onnx_lstm_with_peepholes(
    steps, batch, input_size, hidden, bidirectional, dtype, seed
):
    """Standard-normal weights, each entry drawn on its own, so that every gate block and
    every peephole row differs and a swapped one changes the outputs."""
    rng = np.random.default_rng(seed)
    spec = LSTMSpec(input_size, hidden, bidirectional=bidirectional, dtype=dtype, cell="peephole")
    params = {
        name: rng.standard_normal(shape).astype(dtype)
        for name, shape in spec.param_shapes().items()
    }
    directions = spec.num_directions
    x = rng.standard_normal((steps, batch, input_size)).astype(dtype)
    h0 = rng.standard_normal((directions, batch, hidden)).astype(dtype)
    c0 = rng.standard_normal((directions, batch, hidden)).astype(dtype)
    output, (h_n, c_n), _ = numlstm.forward(x, params, (h0, c0))
    model = onnx_peephole_lstm(params, hidden, bidirectional, dtype)
    y, y_h, y_c = ReferenceEvaluator(model).run(None, {"X": x, "initial_h": h0, "initial_c": c0})
    # ONNX's Y is (T, D, B, H); ours (T, B, D * H).
    expected = y.transpose(0, 2, 1, 3).reshape(steps, batch, directions * hidden)
    rtol = 1e-5 if dtype == np.float32 else TOLERANCE[np.dtype(np.float64)]
    # In float32 both sides round each pre-activation, a sum of products of standard-normal
    # weights and inputs (magnitude up to about 10), to about eps times that, whatever the
    # size of the result: a single h or c close to 0 (0.0069 for one drawn net) carries an
    # absolute error of about 1e-7 that rtol alone, relative to that small value, rejects.
    # 1e-6 (8 eps) floors it; float64 needs no floor.
    atol = 1e-6 if dtype == np.float32 else 0.0
    assert_close(output, expected, rtol=rtol, name="output", atol=atol)
    assert_close(h_n, y_h, rtol=rtol, name="h_n", atol=atol)
    assert_close(c_n, y_c, rtol=rtol, name="c_n", atol=atol)


@pytest.mark.parametrize("cell", ["peephole", "ltm_stm"])
def test_each_variant_differs_from_the_standard_cell(cell):
    """With the variant's own weights set to zero (peephole) or not (LTM/STM), the
    variant's outputs are (resp. are not) the standard cell's on the shared weights."""
    rng = np.random.default_rng(3)
    spec = LSTMSpec(3, 4, dtype="float64", cell=cell)
    params = spec.init_params(rng)
    standard_names = LSTMSpec(3, 4, dtype="float64").param_shapes()
    shared = {name: value for name, value in params.items() if name in standard_names}
    x = rng.standard_normal((5, 2, 3))
    hx = (rng.standard_normal((1, 2, 4)), rng.standard_normal((1, 2, 4)))
    standard, _, _ = numlstm.forward(x, shared, hx)
    variant, _, _ = numlstm.forward(x, params, hx)
    assert np.max(np.abs(variant - standard)) > 1e-3
    if cell == "peephole":
        zero_peepholes = params | {"peephole_l0": np.zeros((3, 4))}
        # The same equations, up to rounding: the two cells' loops are compiled apart, and
        # LLVM may fuse either product of c_t = f_t c_{t-1} + i_t g_t into a multiply-add
        # (measured: 4e-16 apart on c_t at H = 64).
        np.testing.assert_allclose(
            numlstm.forward(x, zero_peepholes, hx)[0], standard, rtol=1e-14, atol=1e-15
        )


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_and_shapes(cell, bias):
    lstm = numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, bias=bias, cell=cell)
    shapes = {name: value.shape for name, value in lstm.state_dict().items()}
    own = {}
    for layer in (0, 1):
        for suffix in ("", "_reverse"):
            if cell == "peephole":
                own[f"peephole_l{layer}{suffix}"] = (3, 4)
            if cell == "ltm_stm":
                own[f"weight_u_l{layer}{suffix}"] = (4, 4)
                if bias:
                    own[f"bias_u_l{layer}{suffix}"] = (4,)
    standard = numlstm.LSTM(3, 4, num_layers=2, bidirectional=True, bias=bias).state_dict()
    assert shapes == {name: value.shape for name, value in standard.items()} | own
    assert lstm.cell == cell
    assert set(lstm.grads) == set(shapes)
    spec, _ = LSTMSpec.from_params(lstm.state_dict())
    assert spec == lstm.spec


@pytest.mark.parametrize("cell", ["peephole", "ltm_stm"])
def test_model_trains_with_its_own_parameters(cell):
    """The class accumulates the variant's own gradients, equal to the functional ones."""
    lstm = numlstm.LSTM(2, 3, dtype="float64", seed=0, cell=cell)
    x = np.random.default_rng(1).standard_normal((4, 2, 2))
    output, _ = lstm(x)
    lstm.backward(np.ones_like(output))
    _, _, tape = numlstm.forward(x, lstm.state_dict())
    _, _, grads = numlstm.backward(tape, np.ones_like(output))
    for name, grad in grads.items():
        np.testing.assert_array_equal(lstm.grads[name], grad, err_msg=name)
    own = "peephole_l0" if cell == "peephole" else "weight_u_l0"
    assert np.any(lstm.grads[own] != 0)


def test_ltm_stm_with_projection_is_a_value_error():
    with pytest.raises(ValueError, match=r"proj_size must be 0 with cell='ltm_stm'.*got 2"):
        numlstm.LSTM(3, 4, proj_size=2, cell="ltm_stm")


@pytest.mark.parametrize("cell", ["lstm", "Peephole", None, 1])
def test_unknown_cell_is_a_value_error_naming_the_argument(cell):
    message = r"cell must be one of 'standard', 'peephole', 'ltm_stm', got "
    with pytest.raises(ValueError, match=message):
        numlstm.LSTM(3, 4, cell=cell)
    with pytest.raises(ValueError, match=message):
        LSTMSpec(3, 4, cell=cell)


def test_mixing_cells_in_a_parameter_dict_is_rejected():
    params = numlstm.LSTM(3, 4, cell="peephole").state_dict()
    params["weight_u_l0"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"unexpected keys \['weight_u_l0'\]"):
        numlstm.forward(np.zeros((2, 1, 3), np.float32), params)


def test_the_ltm_stm_reference_is_the_tutorials_equations():
    """One step of the reference, written out from the tutorial's equations by hand."""
    rng = np.random.default_rng(0)
    spec = LSTMSpec(2, 3, dtype="float64", cell="ltm_stm")
    p = spec.init_params(rng)
    x, stm, ltm = rng.standard_normal(2), rng.standard_normal(3), rng.standard_normal(3)
    w = np.vstack([p["weight_ih_l0"].T, p["weight_hh_l0"].T]).T  # W [E_t, STM_{t-1}]
    b = p["bias_ih_l0"] + p["bias_hh_l0"]
    w_i, w_f, w_n, w_v = np.split(w, 4)
    b_i, b_f, b_n, b_v = np.split(b, 4)
    e_stm = np.concatenate([x, stm])

    def sigma(z):
        return 1 / (1 + np.exp(-z))

    n_t = np.tanh(w_n @ e_stm + b_n)
    i_t = sigma(w_i @ e_stm + b_i)
    f_t = sigma(w_f @ e_stm + b_f)
    ltm_t = ltm * f_t + n_t * i_t
    u_t = np.tanh(p["weight_u_l0"] @ (ltm * f_t) + p["bias_u_l0"])
    v_t = sigma(w_v @ e_stm + b_v)
    stm_t = u_t * v_t
    _, (h_n, c_n) = lstm_forward(
        x[None, None], p, (stm[None, None], ltm[None, None]), cell="ltm_stm"
    )
    np.testing.assert_allclose(h_n[0, 0], stm_t, rtol=1e-12)
    np.testing.assert_allclose(c_n[0, 0], ltm_t, rtol=1e-12)
    ours = numlstm.forward(x[None, None], p, (stm[None, None], ltm[None, None]))
    np.testing.assert_allclose(ours[1][0][0, 0], stm_t, rtol=1e-12)


def test_a_variant_parameter_of_the_wrong_shape_is_named():
    params = numlstm.LSTM(3, 4, cell="peephole").state_dict()
    params["peephole_l0"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"params\['peephole_l0'\].*\(3, 4\).*\(4, 3\)"):
        numlstm.forward(np.zeros((2, 1, 3), np.float32), params)


def test_ltm_stm_parameters_with_a_projection_are_a_value_error():
    params = numlstm.LSTM(3, 4, cell="ltm_stm").state_dict()
    params["weight_hr_l0"] = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"proj_size must be 0 with cell='ltm_stm'"):
        numlstm.forward(np.zeros((2, 1, 3), np.float32), params)
