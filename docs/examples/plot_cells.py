"""
Three cells on the adding problem
=================================

The same task as :ref:`sphx_glr_auto_examples_plot_adding_problem.py`, trained with each of
numlstm's cells: the standard LSTM cell, the cell with peephole connections, and the
tutorial's LTM/STM cell, whose use gate reads the kept long-term memory through a layer of
its own (see :doc:`/tutorial`). Same data, same optimiser, same number of steps; only
``cell=`` changes.
"""

# %%
# Train
# -----
# Sequences of 20 steps, 16 hidden units, 1500 steps of Adam on fresh batches of 32, for
# each cell.

import matplotlib.pyplot as plt
import numpy as np

from numlstm import demo

CELLS = ("standard", "peephole", "ltm_stm")
results = {}
for cell in CELLS:
    results[cell] = demo.train(seq_len=20, hidden=16, steps=1500, seed=0, cell=cell)
    result = results[cell]
    print(
        f"{cell:>8}: {result.seconds:5.1f} s, test MSE {result.test_mse:.5f} "
        f"(baseline {result.baseline_mse:.4f}), {'solved' if result.solved else 'not solved'}"
    )

# %%
# The training curves
# -------------------
# Moving averages over 50 steps of each batch's loss. All three start at the baseline of
# always answering 1.0; each falls once its gates learn to hold the first marked value.

window = 50
fig, ax = plt.subplots(figsize=(7, 4))
for cell, result in results.items():
    smooth = np.convolve(result.losses, np.ones(window) / window, mode="valid")
    ax.semilogy(np.arange(window - 1, len(result.losses)), smooth, lw=2, label=f"cell={cell!r}")
ax.axhline(results["standard"].baseline_mse, color="tab:red", ls="--", label="baseline")
ax.axhline(demo.SOLVED_MSE, color="tab:green", ls=":", label="solved")
ax.set_xlabel("training step")
ax.set_ylabel("mean squared error (moving average)")
ax.set_title("Three LSTM cells on the adding problem, T = 20")
ax.legend()
fig.tight_layout()
