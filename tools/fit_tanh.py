"""Fit the rational approximation of tanh that numlstm uses in float32.

``tanh(x) ~ x P(x^2) / Q(x^2)`` on ``[0, X]`` (odd, so on ``[-X, X]``), with ``P`` of
degree 6 and ``Q`` of degree 3 in ``x^2`` and ``Q(0) = 1``, fitted for the smallest
largest relative error by Lawson's iteratively reweighted least squares on the linearised
error ``(x P - tanh(x) Q) / (tanh(x) Q_previous)``. Prints the coefficients as
:mod:`numlstm.gates` holds them (highest degree first)::

    python tools/fit_tanh.py

and the largest relative error of the fit in float64 (about 2e-8; evaluating it in
float32 adds a few ulp, which ``tests/test_gates.py`` measures).
"""

from __future__ import annotations

import numpy as np

#: Where the approximation stops: beyond it tanh is clamped to ``±tanh(X)``, which rounds
#: to 1 in float32 (``tanh(x)`` does from 9.01).
X = 10.0
NUMERATOR_DEGREE, DENOMINATOR_DEGREE = 6, 3


def fit(iterations=400):
    """Return ``(p, q, error)``: the coefficients of ``P`` and ``Q`` in powers of
    ``x^2``, lowest first, and the fit's largest relative error on its grid."""
    x = np.concatenate([np.linspace(0.0, X, 20_001)[1:], np.geomspace(1e-6, 1e-2, 200)])
    x.sort()
    s = (x / X) ** 2  # powers of x^2 / X^2 keep the least-squares problem well conditioned
    exact = np.tanh(x)
    p_powers = s[:, None] ** np.arange(NUMERATOR_DEGREE + 1)
    q_powers = s[:, None] ** np.arange(1, DENOMINATOR_DEGREE + 1)
    weights = np.full(len(x), 1.0 / len(x))
    q_previous = np.ones_like(x)
    best = (np.inf, None, None)
    for _ in range(iterations):
        scale = 1.0 / (exact * q_previous)
        matrix = np.hstack([x[:, None] * p_powers, -exact[:, None] * q_powers]) * scale[:, None]
        root = np.sqrt(weights)
        solution = np.linalg.lstsq(matrix * root[:, None], exact * scale * root, rcond=None)[0]
        p = solution[: NUMERATOR_DEGREE + 1]
        q = np.concatenate([[1.0], solution[NUMERATOR_DEGREE + 1 :]])
        q_previous = q_powers @ q[1:] + 1.0
        error = (x * (p_powers @ p) / q_previous - exact) / exact
        largest = np.abs(error).max()
        if largest < best[0]:
            best = (largest, p, q)
        weights = weights * np.abs(error) + 1e-300  # Lawson: weight where the error is large
        weights /= weights.sum()
    largest, p, q = best
    # Back from powers of x^2 / X^2 to powers of x^2.
    p = p / X ** (2 * np.arange(NUMERATOR_DEGREE + 1))
    q = q / X ** (2 * np.arange(DENOMINATOR_DEGREE + 1))
    return p, q, largest


if __name__ == "__main__":
    p, q, largest = fit()
    print(f"# largest relative error of the fit (float64): {largest:.3g}")
    print("numerator =", tuple(float(v) for v in p[::-1]))
    print("denominator =", tuple(float(v) for v in q[::-1]))
