"""The gate equations, written once as small scalar functions.

These are scalar functions that Numba compiles into the CPU kernels (``@njit``) and the CUDA
kernels (``@cuda.jit``) alike, so the math of the cell exists in exactly one place. Each
function names the equations it computes (see :mod:`numlstm.equations`).

Derivatives are written in terms of the activations' outputs, which the forward pass
saves: ``σ'(a) = σ(a)(1 - σ(a))`` and ``tanh'(a) = 1 - tanh(a)^2``.

**Why the activations are written out.** ``math.exp`` compiles to a call into libm, which
stops LLVM from vectorising the kernels' loop over hidden units (PyPI's llvmlite has no
SVML). :func:`exp` and :func:`expm1` are therefore plain arithmetic, which LLVM turns into
AVX-512 code: Cody and Waite's range reduction ``x = n ln 2 + r`` with ``|r| <= ln(2)/2``,
a Taylor polynomial for ``e^r - 1`` and ``2^n`` built from its bits.

**Precision follows the data.** Each activation has one implementation per dtype, built
by :func:`_activations` from the same source with that dtype's constants, and chosen at
compile time from the argument's type. float64 uses a degree-13 polynomial (truncation
error below ``1e-17``) and agrees with libm to a few ulp; float32 computes in float32 with
degree 7 (truncation error ``5e-9``), so a float32 kernel runs at twice the SIMD width.
``tests/test_gates.py`` measures both against SciPy.

**Few operations per activation.** The gate loops are bound by the vector instructions
they issue, not by the divider, so the activations are written to need few:
``σ(a) = 1 / (1 + e^{-a})`` with ``e^{-a}`` clamped into the dtype's range, so that
neither the sign of ``a`` nor an overflow needs a branch, and, in float32,
``tanh(a) = a P(a^2) / Q(a^2)``, a rational approximation fitted by
``tools/fit_tanh.py``, accurate to about 2.5 ulp (the form with ``expm1``, which float64
keeps, reached 1.6; a rational function accurate to float64's ulp would need a far higher
degree). Measured on one core in float32: 0.33 -> 0.24 ns per sigmoid and 0.37 -> 0.21 per
tanh; the forward gate loops 2.46 -> 1.92 ns per hidden unit at H = 64 and 1.96 -> 1.36 at
H = 256 (float64: 5.2 -> 4.8 and 4.7 -> 4.1, the sigmoids only).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from numba import njit, types
from numba.extending import overload

from .equations import implements

#: Range reduction ``x = n ln 2 + r``: ``LN2_HI`` has its low bits zero so that ``n * LN2_HI``
#: is exact; ``LN2_LO`` carries the rest of ``ln 2``.
_FLOAT64 = {
    "real": np.float64,
    "bits": np.int64,
    "exponent_bias": 1023,
    "mantissa_bits": 52,
    "log2e": 1.4426950408889634,
    "ln2_hi": 6.93147180369123816490e-01,
    "ln2_lo": 1.90821492927058770002e-10,
    "degree": 13,
    # e^x leaves the normal range (2^-1022) below this; exp flushes such results to 0.
    "exp_floor": -708.0,
    # e^x overflows from 709.78; here the reduction's 2^n is 2^1024, inf (see reduce).
    "exp_ceiling": 710.0,
    # tanh(a) rounds to ±1 beyond |a| = 19.1; clamping -2|a| here changes no result.
    "tanh_floor": -40.0,
    "tanh_rational": None,
}
_FLOAT32 = {
    "real": np.float32,
    "bits": np.int32,
    "exponent_bias": 127,
    "mantissa_bits": 23,
    "log2e": 1.44269504088896341,
    "ln2_hi": 0.693359375,
    "ln2_lo": -2.12194440e-4,
    "degree": 7,
    "exp_floor": -87.0,  # 2^-126 is e^-87.3
    "exp_ceiling": 89.0,  # e^x overflows from 88.72; 2^128 is inf
    # tanh(x) ~ x P(x^2) / Q(x^2) on [-10, 10], clamped beyond (tanh rounds to ±1 from 9.01):
    # the coefficients of P and of Q, highest degree first, as `python tools/fit_tanh.py`
    # prints them. Largest relative error of the fit 2e-8; in float32 arithmetic 2.7e-7.
    "tanh_rational": (
        10.0,
        (
            -6.213162985553095e-14,
            4.3451774955893e-11,
            -1.820520126079612e-08,
            1.064163986255991e-05,
            0.003054189087485913,
            0.1303925607839209,
            0.9999999802875789,
        ),
        (0.0002474104685675479, 0.024296350001234007, 0.46372572135849255, 1.0),
    ),
}


def _activations(constants):
    """Compile ``exp``, ``expm1``, the activations and their derivatives for one dtype.

    Every literal is converted to the dtype first, so that float32 code stays float32
    (a Python float literal would promote it to float64).
    """
    real, bits = constants["real"], constants["bits"]
    log2e, ln2_hi, ln2_lo = (real(constants[k]) for k in ("log2e", "ln2_hi", "ln2_lo"))
    exp_floor, exp_ceiling = real(constants["exp_floor"]), real(constants["exp_ceiling"])
    exponent_bias, mantissa_bits = constants["exponent_bias"], constants["mantissa_bits"]
    # x log2e + rounder is rounded to an integer (the dtype's spacing there is 1) whose low
    # bits hold n + bias, n = round(x log2e), for any n the exponent field can take.
    rounder = real(1.5 * 2.0**mantissa_bits + exponent_bias)
    # Horner's coefficients of (e^r - 1) / r, highest degree first: 1/d!, ..., 1/2!, 1/1!.
    taylor = tuple(real(1.0 / math.factorial(k)) for k in range(constants["degree"], 0, -1))
    zero, one, two = real(0.0), real(1.0), real(2.0)
    # Small enough for LLVM to inline (Numba's own IR inliner mishandles their branches).
    # "contract" lets LLVM fuse each multiply-add of Horner's scheme and of the reduction
    # into one FMA (one rounding instead of two): 2x fewer instructions in the polynomial.
    jit = njit(nogil=True, error_model="numpy", fastmath={"contract"})

    @jit
    def reduce(x):
        # x = n ln 2 + r, |r| <= ln(2)/2, for exp_floor <= x <= exp_ceiling; returns 2^n,
        # r and p with e^r = 1 + r p. Shifted into the exponent field, the low bits of the
        # rounded sum are 2^n (inf at the ceiling, whose n is one past the largest).
        t = x * log2e + rounder
        n = t - rounder
        r = (x - n * ln2_hi) - n * ln2_lo
        p = taylor[0]
        for coefficient in taylor[1:]:
            p = coefficient + r * p
        scale = bits(real(t).view(bits) << mantissa_bits).view(real)
        return scale, r, p

    @jit
    def clamp(x, low, high):
        # x within [low, high], written so that both comparisons let NaN through.
        x = low if x < low else x
        return high if x > high else x

    @jit
    def exp_clamped(x):
        # e^x for x clamped into [exp_floor, exp_ceiling]: inf above e^x's range, e^floor
        # (not 0) below it; NaN gives NaN.
        scale, r, p = reduce(clamp(x, exp_floor, exp_ceiling))
        # Not scale + scale r p: that is inf - inf where 2^n is inf and r < 0.
        return scale * (one + r * p)

    @jit
    def exp(x):
        return exp_clamped(x) if x >= exp_floor else zero

    @jit
    def expm1(x):
        scale, r, p = reduce(max(x, exp_floor))
        return scale * (r * p) + (scale - one)

    @jit
    def sigmoid(a):
        # e^{-a} is inf for a well below e^x's range (sigmoid 0), and e^floor well above
        # it (sigmoid 1): with either sign, no branch.
        return one / (one + exp_clamped(-a))

    if constants["tanh_rational"] is None:
        tanh_floor = real(constants["tanh_floor"])

        @jit
        def tanh(a):
            m = expm1(max(-two * abs(a), tanh_floor))
            t = -m / (two + m)
            if a != a:
                return a
            return t if a >= zero else -t

    else:
        bound, numerator, denominator = constants["tanh_rational"]
        bound, numerator, denominator = (
            real(bound),
            tuple(real(c) for c in numerator),
            tuple(real(c) for c in denominator),
        )

        @jit
        def tanh(a):
            # The output is clamped too: rounding can take x P / Q a few ulp past 1.
            x = clamp(a, -bound, bound)
            s = x * x
            p = numerator[0]
            for coefficient in numerator[1:]:
                p = coefficient + s * p
            q = denominator[0]
            for coefficient in denominator[1:]:
                q = coefficient + s * q
            return clamp(x * p / q, -one, one)

    @jit
    def d_sigmoid(s):
        return s * (one - s)

    @jit
    def d_tanh(t):
        return one - t * t

    return SimpleNamespace(
        exp=exp, expm1=expm1, sigmoid=sigmoid, tanh=tanh, d_sigmoid=d_sigmoid, d_tanh=d_tanh
    )


_BY_DTYPE = {
    np.dtype(np.float64): _activations(_FLOAT64),
    np.dtype(np.float32): _activations(_FLOAT32),
}


def _scalar_function(name):
    """A function of one scalar that picks its dtype's implementation.

    Compiled code resolves the choice at compile time (float32 for float32, float64 for
    any other number); a call from Python uses the argument's NumPy dtype.
    """

    def function(x):
        dtype = np.dtype(np.float32 if isinstance(x, np.float32) else np.float64)
        return getattr(_BY_DTYPE[dtype], name)(x)

    @overload(function, jit_options={"nogil": True, "error_model": "numpy"})
    def typed(x):
        if not isinstance(x, (types.Float, types.Integer)):
            return None
        dtype = np.dtype(np.float32 if x == types.float32 else np.float64)
        implementation = getattr(_BY_DTYPE[dtype], name)
        return lambda x: implementation(x)

    function.__name__ = function.__qualname__ = name
    return function


exp = _scalar_function("exp")
exp.__doc__ = """``e^x`` for ``x <= 0`` (0 below the dtype's normal range), vectorisable."""

expm1 = _scalar_function("expm1")
expm1.__doc__ = """``e^x - 1`` for ``x <= 0``, with full relative accuracy near 0."""

sigmoid = implements("input-gate", "forget-gate", "output-gate", backend="shared")(
    _scalar_function("sigmoid")
)
sigmoid.__doc__ = """Logistic function ``σ(a)``, stable for any input: ``exp`` sees ``-|a|``."""

tanh = implements("cell-candidate", backend="shared")(_scalar_function("tanh"))
tanh.__doc__ = """``tanh(a) = -expm1(-2|a|) / (2 + expm1(-2|a|))``, with the sign of ``a``.

``expm1`` keeps full relative accuracy near 0, and ``|a|`` never overflows it."""

d_sigmoid = implements("d-input-gate", "d-forget-gate", "d-output-gate", backend="shared")(
    _scalar_function("d_sigmoid")
)
d_sigmoid.__doc__ = """Derivative of the sigmoid, from its output: ``σ'(a) = s (1 - s)``."""

d_tanh = implements("d-cell-candidate", "d-cell", backend="shared")(_scalar_function("d_tanh"))
d_tanh.__doc__ = """Derivative of tanh, from its output: ``tanh'(a) = 1 - t^2``."""


@implements(
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_forward(a_i, a_f, a_g, a_o, c_prev):
    """One hidden unit of one step: the four gates and the two memory updates.

    Parameters
    ----------
    a_i, a_f, a_g, a_o : float
        Gate pre-activations ``a_t`` (input term, recurrent term and biases).
    c_prev : float
        The long-term memory ``c_{t-1}``.

    Returns
    -------
    i, f, g, o : float
        The gate activations, saved for the backward pass.
    c : float
        The new long-term memory ``c_t``.
    r : float
        ``o_t ⊙ tanh(c_t)``: the new short-term memory ``h_t``, before any projection.
    """
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c, r = cell_update(i, f, g, o, c_prev)
    return i, f, g, o, c, r


@implements("cell-update", "hidden-update", backend="shared")
@njit(nogil=True, error_model="numpy", inline="always")
def cell_update(i, f, g, o, c_prev):
    """The two memory updates of :func:`cell_forward`, from its gates' activations.

    Parameters
    ----------
    i, f, g, o : float
        The gate activations.
    c_prev : float
        The long-term memory ``c_{t-1}``.

    Returns
    -------
    c : float
        The new long-term memory ``c_t = f_t c_{t-1} + i_t g_t``.
    r : float
        ``o_t ⊙ tanh(c_t)``, the new short-term memory before any projection.
    """
    c = f * c_prev + i * g
    return c, o * tanh(c)


@implements(
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_backward(i, f, g, o, c_prev, c, d_r, d_c_next):
    """Backward of :func:`cell_forward` for one hidden unit of one step.

    Parameters
    ----------
    i, f, g, o : float
        The gate activations saved by the forward pass.
    c_prev, c : float
        The long-term memory before and after the step, ``c_{t-1}`` and ``c_t``.
    d_r : float
        Gradient at ``r_t = o_t ⊙ tanh(c_t)`` (equal to ``δh_t`` without projection).
    d_c_next : float
        Gradient at ``c_t`` carried back from step ``t + 1`` (``δc_{t+1} ⊙ f_{t+1}``).

    Returns
    -------
    d_a_i, d_a_f, d_a_g, d_a_o : float
        Gradients at the gate pre-activations ``δa_t``.
    d_c_prev : float
        The gradient carried to ``c_{t-1}``, that is ``δc_t ⊙ f_t``.
    """
    tanh_c = tanh(c)
    d_c = d_c_next + d_r * o * d_tanh(tanh_c)
    d_a_i = d_c * g * d_sigmoid(i)
    d_a_f = d_c * c_prev * d_sigmoid(f)
    d_a_g = d_c * i * d_tanh(g)
    d_a_o = d_r * tanh_c * d_sigmoid(o)
    return d_a_i, d_a_f, d_a_g, d_a_o, d_c * f


@implements(
    "peephole-input-gate",
    "peephole-forget-gate",
    "cell-candidate",
    "peephole-output-gate",
    "cell-update",
    "hidden-update",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_forward_peephole(a_i, a_f, a_g, a_o, c_prev, p_i, p_f, p_o):
    """:func:`cell_forward` with peephole connections (Gers and Schmidhuber 2000).

    The input and forget gates also see the old long-term memory ``c_{t-1}``, the output
    gate sees the new one ``c_t``.

    Parameters
    ----------
    a_i, a_f, a_g, a_o : float
        Gate pre-activations without the peephole terms.
    c_prev : float
        The long-term memory ``c_{t-1}``.
    p_i, p_f, p_o : float
        The unit's peephole weights.

    Returns
    -------
    i, f, g, o, c, r : float
        As :func:`cell_forward`.
    """
    i = sigmoid(a_i + p_i * c_prev)
    f = sigmoid(a_f + p_f * c_prev)
    g = tanh(a_g)
    c = f * c_prev + i * g
    o = sigmoid(a_o + p_o * c)
    r = o * tanh(c)
    return i, f, g, o, c, r


@implements(
    "d-output-gate",
    "d-peephole-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_backward_peephole(i, f, g, o, c_prev, c, p_i, p_f, p_o, d_r, d_c_next):
    """Backward of :func:`cell_forward_peephole` for one hidden unit of one step.

    Parameters
    ----------
    i, f, g, o, c_prev, c, d_r, d_c_next : float
        As :func:`cell_backward`.
    p_i, p_f, p_o : float
        The unit's peephole weights.

    Returns
    -------
    d_a_i, d_a_f, d_a_g, d_a_o : float
        Gradients at the gate pre-activations (which are also those at the peephole
        terms: ``δp_i = Σ δa^i c_{t-1}``, ``δp_f = Σ δa^f c_{t-1}``, ``δp_o = Σ δa^o c_t``).
    d_c_prev : float
        The gradient carried to ``c_{t-1}``: ``δc_t ⊙ f_t + p_i δa^i_t + p_f δa^f_t``.
    """
    tanh_c = tanh(c)
    d_a_o = d_r * tanh_c * d_sigmoid(o)
    d_c = d_c_next + d_r * o * d_tanh(tanh_c) + p_o * d_a_o
    d_a_i = d_c * g * d_sigmoid(i)
    d_a_f = d_c * c_prev * d_sigmoid(f)
    d_a_g = d_c * i * d_tanh(g)
    return d_a_i, d_a_f, d_a_g, d_a_o, d_c * f + p_i * d_a_i + p_f * d_a_f


@implements(
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "kept-memory",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_forward_ltm_stm(a_i, a_f, a_g, a_v, c_prev):
    """The LTM/STM cell's gates and memory update for one hidden unit of one step.

    The tutorial's cell: learn gate ``N = g``, ignore factor ``i``, forget factor ``f``
    and the use gate's factor ``V = v``; the remember gate gives the new long-term
    memory. The use gate's layer reads the kept memory ``m = f ⊙ c_{t-1}`` through
    ``W_u``, a product over all units; :func:`use_gate_ltm_stm` finishes the step.

    Returns
    -------
    i, f, g, v : float
        The gate activations, saved for the backward pass.
    c : float
        The new long-term memory ``LTM_t``.
    m : float
        The kept memory ``LTM_{t-1} ⊙ f_t``, the use layer's input.
    """
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    v = sigmoid(a_v)
    m = f * c_prev
    return i, f, g, v, m + i * g, m


@implements("use-layer", "use-gate-output", backend="shared")
@njit(nogil=True, error_model="numpy", inline="always")
def use_gate_ltm_stm(a_u, v):
    """The LTM/STM cell's use gate: ``U = tanh(a^u)``, ``STM_t = U ⊙ V``.

    Returns
    -------
    u, h : float
    """
    u = tanh(a_u)
    return u, u * v


@implements("d-use-gate", "d-use-layer", backend="shared")
@njit(nogil=True, error_model="numpy", inline="always")
def use_gate_backward_ltm_stm(u, v, d_h):
    """Backward of :func:`use_gate_ltm_stm`: ``(δa^u, δa^v)`` from ``δSTM_t``."""
    return d_h * v * d_tanh(u), d_h * u * d_sigmoid(v)


@implements(
    "d-ltm-stm-cell",
    "d-input-gate",
    "d-ltm-stm-forget-gate",
    "d-cell-candidate",
    backend="shared",
)
@njit(nogil=True, error_model="numpy", inline="always")
def cell_backward_ltm_stm(i, f, g, c_prev, d_m, d_c_next):
    """Backward of :func:`cell_forward_ltm_stm` for one hidden unit of one step.

    Parameters
    ----------
    i, f, g : float
        The gate activations saved by the forward pass.
    c_prev : float
        ``LTM_{t-1}``.
    d_m : float
        Gradient at the kept memory ``m = f ⊙ c_{t-1}`` from the use layer
        (``W_u^T δa^u``).
    d_c_next : float
        Gradient at ``LTM_t`` carried back from step ``t + 1``: ``LTM_t`` feeds only the
        next step, not ``STM_t``.

    Returns
    -------
    d_a_i, d_a_f, d_a_g : float
    d_c_prev : float
        ``(δLTM_t + δm) ⊙ f_t``.
    """
    d_kept = d_c_next + d_m
    d_a_i = d_c_next * g * d_sigmoid(i)
    d_a_f = d_kept * c_prev * d_sigmoid(f)
    d_a_g = d_c_next * i * d_tanh(g)
    return d_a_i, d_a_f, d_a_g, d_kept * f
