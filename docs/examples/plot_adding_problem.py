"""
The adding problem
==================

Each input sequence has two features per step: a random value in [0, 1) and a marker that
is 1 at exactly two steps, one in each half of the sequence. The target is the sum of the
two marked values (Hochreiter and Schmidhuber, 1997). The model must notice the first
marked value, keep it in its long-term memory across the sequence while ignoring
everything else, and add the second one at the end.

Always answering 1.0, the mean of the target, gives a mean squared error of about 1/6;
a test error below 0.01 counts as solved. :mod:`numlstm.demo` has the model (an LSTM and a
linear readout of its last hidden state) and the training loop (Adam, gradient clipping, a
cosine learning-rate schedule); ``numlstm demo`` runs it from a shell with longer
sequences and more steps.
"""

# %%
# Train
# -----
# Sequences of 30 steps, 32 hidden units, 2000 steps of Adam on fresh batches of 32.

import matplotlib.pyplot as plt
import numpy as np

from numlstm import demo

result = demo.train(seq_len=30, hidden=32, steps=2000, seed=0)
print(f"training: {result.seconds:.1f} s for {len(result.losses)} steps")
print(f"test MSE {result.test_mse:.5f}, baseline (always 1.0) {result.baseline_mse:.4f}")
print("solved" if result.solved else "not solved")

# %%
# The training curve
# ------------------
# The loss of each batch, and its moving average over 50 steps. It stays at the baseline
# while the model learns to find the markers, then falls by orders of magnitude once the
# forget gate learns to hold the first value.

window = 50
smooth = np.convolve(result.losses, np.ones(window) / window, mode="valid")
fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(result.losses, color="0.75", lw=0.8, label="batch loss")
ax.semilogy(np.arange(window - 1, len(result.losses)), smooth, lw=2, label="moving average")
ax.axhline(result.baseline_mse, color="tab:red", ls="--", label="baseline: always 1.0")
ax.axhline(demo.SOLVED_MSE, color="tab:green", ls=":", label="solved")
ax.set_xlabel("training step")
ax.set_ylabel("mean squared error")
ax.set_title("LSTM on the adding problem, T = 30")
ax.legend()
fig.tight_layout()

# %%
# A few answers
# -------------
# Test sequences, their targets and the model's answers.

rng = np.random.default_rng(1)
x, y = demo.adding_problem(rng, batch=5, seq_len=30)
for target, answer in zip(y, result.model.predict(x), strict=True):
    print(f"target {target:.3f}   answer {answer:.3f}")
