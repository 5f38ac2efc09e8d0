"""
Forecasting a noisy sine wave
=============================

An LSTM reads a noisy sine wave and predicts, at each step, the next value. The noise is
unpredictable, so the best forecast is the clean wave: a model that has learned the
signal, rather than the noise, lies close to the truth and not to the noisy points.

The model is a one-layer :class:`numlstm.LSTM` and a linear readout of every hidden state,
trained on the mean squared error with :class:`numlstm.demo.Adam`. The readout's gradient
is written by hand; the LSTM's comes from :meth:`numlstm.LSTM.backward`, with the gradient
at every output.
"""

# %%
# The data
# --------
# A wave of period 25 steps, with Gaussian noise of standard deviation 0.2. Training
# windows of 60 steps are cut from the first 4000 steps; the rest is the test stretch.

import matplotlib.pyplot as plt
import numpy as np

import numlstm
from numlstm.demo import Adam, clip_global_norm

rng = np.random.default_rng(0)
period, noise, steps_total = 25.0, 0.2, 4600
clean = np.sin(2 * np.pi * np.arange(steps_total) / period).astype(np.float32)
noisy = clean + noise * rng.standard_normal(steps_total).astype(np.float32)
train_end = 4000


def batch(rng, size, window=60):
    """Windows of the training stretch: inputs (T, B, 1) and next-step targets (T, B)."""
    starts = rng.integers(0, train_end - window - 1, size)
    index = starts[None, :] + np.arange(window)[:, None]
    return noisy[index][:, :, None], noisy[index + 1]


# %%
# The model and its training loop
# -------------------------------
# The first 10 steps of each window only warm the state up and are left out of the loss.

hidden, warmup = 24, 10
lstm = numlstm.LSTM(1, hidden, seed=0)
readout = {
    "readout_weight": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
    "readout_bias": np.zeros(1, np.float32),
}
optimizer = Adam({**dict(lstm.named_parameters()), **readout}, lr=1e-2)
losses = []
for _ in range(400):
    x, target = batch(rng, size=32)
    output, _ = lstm(x)  # (T, B, H)
    prediction = output @ readout["readout_weight"] + readout["readout_bias"]
    error = (prediction - target)[warmup:]
    losses.append(float(np.mean(error**2)))
    d_prediction = np.zeros_like(prediction)
    d_prediction[warmup:] = 2 * error / error.size
    readout_grads = {
        "readout_weight": np.einsum("tbh,tb->h", output, d_prediction),
        "readout_bias": np.array([d_prediction.sum()], np.float32),
    }
    lstm.zero_grad()
    lstm.backward(d_prediction[:, :, None] * readout["readout_weight"])
    grads = {**lstm.grads, **readout_grads}
    clip_global_norm(grads, 1.0)
    optimizer.step(grads)
print(f"training loss, mean of the first 20 steps: {np.mean(losses[:20]):.4f}")
print(f"training loss, mean of the last 20 steps: {np.mean(losses[-20:]):.4f}")
print(f"noise variance (the least a forecast of the noisy points can reach): {noise**2:.4f}")

# %%
# Prediction against truth
# ------------------------
# One pass over the whole test stretch, in inference mode: one-step-ahead forecasts,
# against the clean wave and the noisy values the model read.

with numlstm.no_grad():
    output, _ = lstm(noisy[train_end:-1, None, None])
forecast = output[:, 0] @ readout["readout_weight"] + readout["readout_bias"]
truth = clean[train_end + 1 :]
seen = noisy[train_end + 1 :]
print(f"test MSE against the clean wave: {np.mean((forecast - truth) ** 2):.4f}")
print(f"test MSE of the noisy values against the clean wave: {np.mean((seen - truth) ** 2):.4f}")

shown = slice(warmup, warmup + 150)
t = np.arange(len(truth))[shown]
fig, ax = plt.subplots(figsize=(8, 4))
ax.plot(t, seen[shown], ".", color="0.6", ms=4, label="noisy observations")
ax.plot(t, truth[shown], color="k", lw=1.5, label="truth (clean wave)")
ax.plot(t, forecast[shown], color="tab:orange", lw=2, label="LSTM forecast, one step ahead")
ax.set_xlabel("test step")
ax.legend(loc="upper right", ncol=3, fontsize=9)
ax.set_ylim(-1.9, 2.2)
ax.set_title("Noisy sine wave: forecast against truth")
fig.tight_layout()
