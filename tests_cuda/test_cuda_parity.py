"""The CUDA backend computes what the CPU backend computes: every output and gradient.

Each case runs ``numlstm.forward`` and ``numlstm.backward`` on both backends (the
process-wide default decides) with the same arrays, dropout masks included, and compares
everything: ``output``, ``h_n``, ``c_n``, ``d_x``, ``d_h0``, ``d_c0`` and the gradient of
every parameter. float64 to :data:`TOLERANCE` (1e-9); float32 to its entry in the same
table, with the scale floored at 1 as in the torch parity tests (see
``lstm_cases.assert_close_float32``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import TOLERANCE, assert_close, to_host
from hypothesis import given, settings
from hypothesis import strategies as st
from lstm_cases import Case, assert_close_float32, cases, forward_backward, make_arrays

import numlstm


def case(**changes):
    """A small case; keyword arguments change its fields."""
    base = Case(
        steps=4,
        batch=3,
        input_size=3,
        hidden_size=5,
        num_layers=1,
        bidirectional=False,
        proj_size=0,
        bias=True,
        layout="time_major",
        lengths=None,
        with_hx=False,
        dropout=0.0,
        seed=11,
    )
    return dataclasses.replace(base, **changes)


#: Small configurations that together cover every feature: layers, directions,
#: projection, unsorted and padded lengths, initial states, dropout masks, no bias, and the
#: three layouts.
CASES = {
    "one-layer": case(),
    "bidirectional-projection-lengths-states": case(
        bidirectional=True, proj_size=2, lengths=(2, 4, 1), with_hx=True, layout="batch_first"
    ),
    "three-layers-dropout-lengths": case(
        num_layers=3, hidden_size=4, lengths=(3, 1, 4), dropout=0.5, seed=3
    ),
    "two-layers-bidirectional-projection-dropout-no-bias": case(
        num_layers=2,
        bidirectional=True,
        proj_size=3,
        bias=False,
        with_hx=True,
        dropout=0.25,
        lengths=(4, 4, 2),
        seed=5,
    ),
    "unbatched-bidirectional-states": case(
        layout="unbatched", batch=1, bidirectional=True, with_hx=True, seed=8
    ),
    "peephole-two-layers-bidirectional-projection-lengths": case(
        cell="peephole",
        num_layers=2,
        bidirectional=True,
        proj_size=2,
        lengths=(3, 1, 4),
        with_hx=True,
        dropout=0.5,
        seed=9,
    ),
    "ltm_stm-two-layers-bidirectional-lengths-no-bias": case(
        cell="ltm_stm",
        num_layers=2,
        bidirectional=True,
        bias=False,
        lengths=(4, 2, 1),
        with_hx=True,
        layout="batch_first",
        seed=10,
    ),
}


def compare(actual, expected, dtype):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        if dtype == np.float32:
            assert_close_float32(to_host(actual[name]), value, TOLERANCE[np.dtype(dtype)], name)
        else:
            assert_close(to_host(actual[name]), value, dtype, name=name)


#: Every case in float64; in float32 the case that covers the most features (the simulator
#: is slow, and float32 differs from float64 only in rounding, not in code path).
RUNS = [(name, np.float64) for name in CASES] + [
    ("bidirectional-projection-lengths-states", np.float32),
    ("three-layers-dropout-lengths", np.float32),
    ("peephole-two-layers-bidirectional-projection-lengths", np.float32),
    ("ltm_stm-two-layers-bidirectional-lengths-no-bias", np.float32),
]


@pytest.mark.parametrize(
    ("config", "dtype"),
    [(CASES[name], dtype) for name, dtype in RUNS],
    ids=[f"{name}-{np.dtype(dtype)}" for name, dtype in RUNS],
)
def test_cuda_equals_cpu_forward_and_every_gradient(config, dtype, launch, loop_config, on_backend):
    arrays = make_arrays(config, dtype)
    expected = on_backend("cpu", forward_backward, config, arrays)
    actual = on_backend("cuda", forward_backward, config, arrays)
    for name, value in actual.items():
        assert isinstance(value, np.ndarray), f"{name}: NumPy in must give NumPy out"
    compare(actual, expected, dtype)


@settings(max_examples=8)
@given(
    case=cases(max_layers=2, cells=("standard", "peephole", "ltm_stm")),
    dtype=st.sampled_from([np.float64, np.float32]),
)
def test_cuda_equals_cpu_on_drawn_cases(case, dtype):
    """The same comparison on cases Hypothesis draws (every feature, tiny sizes)."""
    arrays = make_arrays(case, dtype)
    expected = {}
    for backend in ("cpu", "cuda"):
        numlstm.set_backend(backend)
        try:
            expected[backend] = forward_backward(case, arrays)
        finally:
            numlstm.set_backend(None)
    compare(expected["cuda"], expected["cpu"], dtype)
