"""
Checking gradients against finite differences
=============================================

:meth:`numlstm.LSTM.backward` computes exact gradients with the backward equations of
the :doc:`equations page <../equations>`. This example checks them the way anyone can,
against central finite differences, on a small float64 model with every feature at once:
two layers, both directions, a projection, sequences of different lengths and given
initial states.

For a scalar loss :math:`L`, the central difference
:math:`(L(\\theta + \\epsilon) - L(\\theta - \\epsilon)) / 2\\epsilon` matches the derivative
up to a truncation error of order :math:`\\epsilon^2` and a rounding error of order
:math:`10^{-16} |L| / \\epsilon`; with :math:`\\epsilon = 10^{-5}` in float64 both are
about :math:`10^{-10}`.
"""

# %%
# The model and a loss that reads everything
# ------------------------------------------
# The loss is a fixed random weighting of the output and of both final states, so every
# output and state carries a gradient.

import matplotlib.pyplot as plt
import numpy as np

import numlstm

rng = np.random.default_rng(0)
steps, batch, inputs, hidden, proj = 6, 3, 3, 4, 2
lstm = numlstm.LSTM(
    inputs, hidden, num_layers=2, bidirectional=True, proj_size=proj, dtype="float64", seed=0
)
x = rng.standard_normal((steps, batch, inputs))
h0 = rng.standard_normal((4, batch, proj))  # (num_layers * directions, B, proj_size)
c0 = rng.standard_normal((4, batch, hidden))
lengths = [6, 3, 5]
output, (h_n, c_n) = lstm(x, (h0, c0), lengths)
w_output, w_h, w_c = (rng.standard_normal(a.shape) for a in (output, h_n, c_n))


def loss():
    output, (h_n, c_n) = lstm(x, (h0, c0), lengths)
    return np.sum(w_output * output) + np.sum(w_h * h_n) + np.sum(w_c * c_n)


# %%
# Analytic gradients
# ------------------
# The gradient of the loss at the output and at the final states is the weighting itself.

loss()
lstm.zero_grad()
d_x, (d_h0, d_c0) = lstm.backward(w_output, (w_h, w_c))
analytic = {**lstm.grads, "x": d_x, "h0": d_h0, "c0": d_c0}

# %%
# Central differences
# -------------------
# Every entry of every parameter and input is nudged in turn: 2 loss evaluations each.


def central_difference(array, eps=1e-5):
    grad = np.empty_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + eps
        plus = loss()
        array[index] = saved - eps
        minus = loss()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


arrays = {**dict(lstm.named_parameters()), "x": x, "h0": h0, "c0": c0}
numeric = {name: central_difference(array) for name, array in arrays.items()}

# %%
# The table
# ---------
# For each array: its shape, the largest gradient entry, the largest difference between
# the analytic and the numeric gradient, and that difference relative to the largest
# entry (the finite differences' error is absolute, so tiny entries would inflate an
# entry-by-entry ratio).

print(f"{'array':<24}{'shape':<12}{'max |grad|':>12}{'max abs diff':>15}{'max rel diff':>15}")
worst = 0.0
for name in arrays:
    difference = np.abs(analytic[name] - numeric[name])
    relative = float(np.max(difference) / np.max(np.abs(numeric[name])))
    worst = max(worst, relative)
    shape = "x".join(map(str, arrays[name].shape))
    print(
        f"{name:<24}{shape:<12}{np.max(np.abs(numeric[name])):>12.4f}"
        f"{np.max(difference):>15.2e}{relative:>15.2e}"
    )
print(f"\nworst relative difference: {worst:.1e}")
assert worst < 1e-6, "the analytic gradient disagrees with the finite differences"

# %%
# Every entry at a glance
# -----------------------
# Each point is one gradient entry: the analytic value against the numeric one. They lie
# on the diagonal; the padded steps of ``x`` (beyond each sequence's length) have zero
# gradient in both.

everything_numeric = np.concatenate([numeric[n].ravel() for n in arrays])
everything_analytic = np.concatenate([analytic[n].ravel() for n in arrays])
fig, ax = plt.subplots(figsize=(5, 5))
ax.plot(everything_numeric, everything_analytic, ".", ms=4)
limit = np.max(np.abs(everything_numeric)) * 1.05
ax.plot([-limit, limit], [-limit, limit], color="0.6", lw=1, zorder=0)
ax.set_xlabel("central difference")
ax.set_ylabel("numlstm backward")
ax.set_title(f"{everything_numeric.size} gradient entries")
ax.set_aspect("equal")
fig.tight_layout()
