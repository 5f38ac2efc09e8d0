"""The shared gate functions: accuracy of the vectorisable activations, and vectorisation.

``numlstm.gates`` computes ``exp`` in plain arithmetic (so that LLVM vectorises the kernels'
loops), in the dtype of its argument. These tests state how accurate that is, against
SciPy's ``expit`` and NumPy's ``tanh``/``exp``/``expm1`` evaluated in float64, and check
that the CPU kernels' gate loops really compile to SIMD code.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.special
from numba import njit

from numlstm import gates
from numlstm.backends import cpu

#: Largest error allowed, relative to the exact value, where the exact value is a normal
#: number. float64: a few ulp (2.2e-16 each), the accuracy of libm. float32: a few ulp of
#: float32 (6e-8 each); the degree-7 polynomial's own error is 5e-9, and the rational tanh
#: measured 2.7e-7 (its fit's own error is 2e-8, the rest is float32 arithmetic).
RELATIVE_ERROR = {np.float64: 1e-15, np.float32: 4e-7}

FUNCTIONS = {
    "sigmoid": (gates.sigmoid, lambda x: scipy.special.expit(x)),
    "tanh": (gates.tanh, np.tanh),
    "exp": (gates.exp, np.exp),
    "expm1": (gates.expm1, np.expm1),
}


def _compiled_map(function):
    @njit
    def apply(x, out):
        for k in range(x.size):
            out[k] = function(x[k])

    return apply


_APPLY = {name: _compiled_map(function) for name, (function, _) in FUNCTIONS.items()}


def _arguments(name, dtype):
    rng = np.random.default_rng(0)
    limit = 30.0 if dtype == np.float32 else 60.0
    x = np.concatenate(
        [
            rng.uniform(-limit, limit, 200_000),
            rng.uniform(-1e-3, 1e-3, 20_000),
            np.geomspace(1e-30, 1e-3, 1000),
            -np.geomspace(1e-30, 1e-3, 1000),
            [0.0, -0.0],
        ]
    ).astype(dtype)
    if name in ("exp", "expm1"):  # defined on x <= 0 only: they serve exp(-|a|)
        x = -np.abs(x)
    return x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_activation_matches_the_float64_reference_to_a_few_ulp(name, dtype):
    x = _arguments(name, dtype)
    out = np.empty_like(x)
    _APPLY[name](x, out)
    assert out.dtype == dtype
    exact = FUNCTIONS[name][1](x.astype(np.float64))
    normal = np.abs(exact) >= np.finfo(dtype).tiny
    error = np.abs(out[normal] - exact[normal]) / np.abs(exact[normal])
    assert error.max() <= RELATIVE_ERROR[dtype], (
        f"{name} in {np.dtype(dtype).name}: relative error {error.max():.3g} at "
        f"x = {x[normal][error.argmax()]!r}"
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_activations_saturate_and_keep_nan(dtype):
    x = np.array([np.inf, -np.inf, 1e4, -1e4, np.nan], dtype)
    sigmoid, tanh = np.empty_like(x), np.empty_like(x)
    _APPLY["sigmoid"](x, sigmoid)
    _APPLY["tanh"](x, tanh)
    np.testing.assert_array_equal(sigmoid[:4], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(tanh[:4], [1.0, -1.0, 1.0, -1.0])
    assert np.isnan(sigmoid[4]) and np.isnan(tanh[4])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tanh_is_odd_and_within_one(dtype):
    """float32's rational tanh, clamped at both ends, never leaves [-1, 1] (rounding takes
    x P / Q a few ulp past 1 near saturation) and is odd, as tanh is."""
    x = np.linspace(0.0, 12.0, 1_000_001).astype(dtype)
    t, t_negative = np.empty_like(x), np.empty_like(x)
    _APPLY["tanh"](x, t)
    _APPLY["tanh"](-x, t_negative)
    assert np.abs(t).max() <= 1.0
    np.testing.assert_array_equal(t_negative, -t)


def test_exp_is_zero_below_the_normal_range():
    x = np.array([-800.0, -np.inf])
    out = np.empty_like(x)
    _APPLY["exp"](x, out)
    np.testing.assert_array_equal(out, [0.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_python_calls_give_the_compiled_results(dtype):
    x = dtype(-0.75)
    for name, (function, _) in FUNCTIONS.items():
        out = np.empty(1, dtype)
        _APPLY[name](np.array([x]), out)
        assert function(x) == out[0], name


def _vector_instructions(assembly):
    return len(re.findall(r"\b(?:v\w+p[sd])\s+%[yz]mm", assembly))


def _row_arguments(dtype, hidden):
    """Arguments of each row function: ``G`` a (4H,) gate row, ``U`` an (H,) unit row,
    ``P`` a (3, H) peephole array, ``0`` the first unit."""
    g, u, p = np.zeros(4 * hidden, dtype), np.zeros(hidden, dtype), np.zeros((3, hidden), dtype)
    rows = {
        cpu.cell_forward_row: "GUUU0",
        cpu.cell_backward_row: "GUUUUG0",
        cpu.cell_forward_row_peephole: "GPUUU",
        cpu.cell_backward_row_peephole: "GUUPUUG",
        cpu.cell_forward_row_ltm_stm: "GUUU",
        cpu.use_gate_row_ltm_stm: "UUUU",
        cpu.cell_backward_row_ltm_stm: "GUUUG",
        cpu.use_gate_backward_row_ltm_stm: "UUUUU",
    }
    arrays = {"G": g, "U": u, "P": p, "0": np.zeros((), np.int64)}
    return {kernel: [arrays[k].copy()[()] for k in kinds] for kernel, kinds in rows.items()}


ROW_KERNELS = list(_row_arguments(np.float64, 1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kernel", ROW_KERNELS, ids=lambda kernel: kernel.__name__)
def test_the_gate_loops_compile_to_simd_code(kernel, dtype):
    """A call to libm, or a loop LLVM could not prove free of overlap, would leave the gate
    loops scalar and about 10x slower; packed instructions on ymm/zmm registers show that
    they are vectorised. (Compiled afresh: Numba cannot show the assembly of cached code.)
    Every cell's row functions, forward and backward."""
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
    fresh = njit(**options)(kernel.py_func)
    fresh(*_row_arguments(dtype, 8)[kernel])
    count = _vector_instructions(fresh.inspect_asm(fresh.signatures[0]))
    # Fewer operations per unit, fewer packed ops: the LTM/STM use gate is one tanh, and
    # its backward rows have no activation at all (measured: 30, 25 and 28 packed ops at
    # least, float32; a scalar loop has none).
    minimum = {
        cpu.use_gate_row_ltm_stm: 20,
        cpu.cell_backward_row_ltm_stm: 20,
        cpu.use_gate_backward_row_ltm_stm: 20,
    }.get(kernel, 50)
    assert count > minimum, f"{kernel.__name__} ({np.dtype(dtype).name}): {count} packed ops"
