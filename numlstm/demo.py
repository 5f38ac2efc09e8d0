"""The demo: an LSTM learns the adding problem.

The adding problem (Hochreiter & Schmidhuber, 1997, experiment 4) is a classic test of
long-term memory. Each input sequence has ``T`` steps of two features: a random value in
``[0, 1]`` and a marker that is 1 at exactly two steps (one in each half of the sequence)
and 0 elsewhere. The target is the sum of the two marked values. The model reads the whole
sequence and answers only after the last step, so it must notice the first marked value,
keep it for up to ``T`` steps while ignoring everything else, and add the second one. A
plain RNN fails at this: its gradient through ``T`` steps vanishes, so it learns no more
than the best constant answer, 1.0 (the mean of the sum), whose mean squared error is the
variance of the sum of two uniform values, 1/6 ≈ 0.167. An LSTM's cell state carries the
value across the sequence with its forget gate near 1, and it solves the problem: its
error falls far below the baseline (below 0.01 counts as solved).

The model here is :class:`numlstm.LSTM` ``(2, hidden)``, then a linear readout of its final
hidden state, trained with Adam on the mean squared error. The readout's gradient is
written by hand; the LSTM's comes from :meth:`numlstm.LSTM.backward`.

Examples
--------
>>> from numlstm import demo
>>> result = demo.train(seq_len=10, hidden=8, steps=30)
>>> result.losses.shape
(30,)

From the command line: ``numlstm demo`` (or ``python -m numlstm demo``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from .grad_mode import no_grad
from .lstm import LSTM

#: A test mean squared error below this counts as solving the adding problem.
SOLVED_MSE = 0.01

#: The answer of the baseline that ignores its input: the mean of the target.
BASELINE_ANSWER = 1.0

#: Defaults of :func:`train` (and of ``numlstm demo``), tuned to solve ``T = 50`` in about
#: a minute on two CPU cores.
SEQ_LEN = 50
HIDDEN = 32
BATCH_SIZE = 32
STEPS = 4000
LR = 1e-2
CLIP_NORM = 1.0
TEST_SIZE = 1000


def adding_problem(rng, batch, seq_len, dtype="float32"):
    """Draw a batch of the adding problem.

    Parameters
    ----------
    rng : numpy.random.Generator
        The source of randomness.
    batch : int
        Sequences in the batch, ``B >= 1``.
    seq_len : int
        Steps per sequence, ``T >= 2`` (one marker in each half).
    dtype : str or numpy.dtype
        The dtype of ``x`` and ``y``.

    Returns
    -------
    x : (T, B, 2) array
        Time-major sequences (the layout :class:`numlstm.LSTM` takes by default). Feature
        0 is a value uniform in ``[0, 1)``; feature 1 is the marker, 1 at one step of
        ``[0, T // 2)`` and one step of ``[T // 2, T)``, 0 elsewhere.
    y : (B,) array
        The sum of each sequence's two marked values.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one marker in each half), got {seq_len}")
    half = seq_len // 2
    first = rng.integers(0, half, size=batch)
    second = rng.integers(half, seq_len, size=batch)
    columns = np.arange(batch)
    x = np.zeros((seq_len, batch, 2), dtype)
    x[:, :, 0] = rng.random((seq_len, batch))
    x[first, columns, 1] = 1
    x[second, columns, 1] = 1
    y = x[first, columns, 0] + x[second, columns, 0]
    return x, y


class Adam:
    """Adam (Kingma & Ba, 2015) on a dict of named arrays, updated in place.

    Parameters
    ----------
    params : dict of str to array
        The live parameter arrays; :meth:`step` changes them in place.
    lr : float
        The learning rate; may be changed between steps (a schedule).
    betas : tuple of float
        Decay rates of the running means of the gradient and of its square.
    eps : float
        Added to the root mean square of the gradient, against division by zero.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params = dict(params)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.mean = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.mean_square = {name: np.zeros_like(p) for name, p in self.params.items()}

    def step(self, grads):
        """Update every parameter from its gradient ``grads[name]``."""
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1**self.steps
        correction2 = 1 - beta2**self.steps
        for name, param in self.params.items():
            grad = grads[name]
            mean, mean_square = self.mean[name], self.mean_square[name]
            mean *= beta1
            mean += (1 - beta1) * grad
            mean_square *= beta2
            mean_square += (1 - beta2) * grad * grad
            param -= (
                self.lr * (mean / correction1) / (np.sqrt(mean_square / correction2) + self.eps)
            )


def clip_global_norm(grads, max_norm):
    """Scale all gradients in place so that their joint L2 norm is at most ``max_norm``.

    Returns
    -------
    float
        The norm before clipping.
    """
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if norm > max_norm:
        for grad in grads.values():
            grad *= max_norm / norm
    return norm


class AddingModel:
    """An LSTM ``(2, hidden)`` and a linear readout of its final hidden state.

    ``prediction = h_n[-1] @ readout_weight + readout_bias``, one number per sequence.

    Parameters
    ----------
    hidden : int
        Hidden units of the LSTM.
    rng : numpy.random.Generator
        Draws the initial parameters.
    dtype : str
        ``"float32"`` or ``"float64"``.
    backend : str
        The LSTM's backend, ``"auto"``, ``"cpu"`` or ``"cuda"``.
    cell : str
        The LSTM's cell: ``"standard"``, ``"peephole"`` or ``"ltm_stm"``.
    """

    def __init__(self, hidden, rng, dtype="float32", backend="auto", cell="standard"):
        seed = int(rng.integers(2**31))
        self.lstm = LSTM(2, hidden, dtype=dtype, backend=backend, seed=seed, cell=cell)
        bound = 1 / math.sqrt(hidden)
        self.readout = {
            "readout_weight": rng.uniform(-bound, bound, hidden).astype(dtype),
            "readout_bias": np.zeros(1, dtype),
        }
        self.readout_grads = {name: np.zeros_like(p) for name, p in self.readout.items()}

    def parameters(self):
        """All live parameter arrays by name: the LSTM's, then the readout's."""
        return {**dict(self.lstm.named_parameters()), **self.readout}

    def grads(self):
        """All accumulated gradients, with the names of :meth:`parameters`."""
        return {**self.lstm.grads, **self.readout_grads}

    def zero_grad(self):
        """Set every accumulated gradient to zero."""
        self.lstm.zero_grad()
        for grad in self.readout_grads.values():
            grad[...] = 0

    def _readout(self, h_last):
        return h_last @ self.readout["readout_weight"] + self.readout["readout_bias"]

    def predict(self, x):
        """Predictions ``(B,)`` for sequences ``x`` ``(T, B, 2)``, saving nothing."""
        with no_grad():
            _, (h_n, _) = self.lstm(x)
        return self._readout(h_n[-1])

    def loss_and_backward(self, x, y):
        """Mean squared error on a batch; its gradient is added into :meth:`grads`.

        Parameters
        ----------
        x : (T, B, 2) array
        y : (B,) array

        Returns
        -------
        float
            The loss ``mean((prediction - y) ** 2)``.
        """
        _, (h_n, c_n) = self.lstm(x)
        h_last = h_n[-1]
        error = self._readout(h_last) - y
        d_prediction = (2 / len(y)) * error
        self.readout_grads["readout_weight"] += h_last.T @ d_prediction
        self.readout_grads["readout_bias"] += d_prediction.sum()
        d_h_n = np.zeros_like(h_n)
        d_h_n[-1] = np.outer(d_prediction, self.readout["readout_weight"])
        self.lstm.backward(None, (d_h_n, np.zeros_like(c_n)))
        return float(np.mean(error * error))


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    losses : (steps,) array
        The training loss (mean squared error of each batch) at every step.
    test_mse : float
        Mean squared error on a held-out test set.
    baseline_mse : float
        Mean squared error of always answering :data:`BASELINE_ANSWER` on the same set.
    seconds : float
        Wall time of the training loop.
    model : AddingModel
        The trained model.
    """

    losses: np.ndarray
    test_mse: float
    baseline_mse: float
    seconds: float
    model: AddingModel

    @property
    def solved(self):
        """Whether the test error is below :data:`SOLVED_MSE`."""
        return self.test_mse < SOLVED_MSE


def train(
    seq_len=SEQ_LEN,
    hidden=HIDDEN,
    steps=STEPS,
    batch_size=BATCH_SIZE,
    lr=LR,
    clip_norm=CLIP_NORM,
    seed=0,
    backend="auto",
    dtype="float32",
    test_size=TEST_SIZE,
    progress=None,
    cell="standard",
):
    """Train an :class:`AddingModel` on the adding problem and test it.

    Every step draws a fresh batch, so the model never sees a sequence twice. The learning
    rate follows a cosine from ``lr`` down to 0 over the ``steps``.

    Parameters
    ----------
    seq_len : int
        ``T``, steps per sequence (at least 2).
    hidden : int
        Hidden units of the LSTM.
    steps : int
        Optimiser steps.
    batch_size : int
        Sequences per step.
    lr : float
        Adam's initial learning rate.
    clip_norm : float or None
        Clip the gradients to this global L2 norm before each step; None for no clipping.
    seed : int or None
        Seeds the data, the initial parameters and the test set.
    backend : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    dtype : str
        ``"float32"`` or ``"float64"``.
    test_size : int
        Sequences in the held-out test set.
    progress : callable, optional
        Called as ``progress(step, loss)`` after each step (``step`` from 1).
    cell : str
        The LSTM's cell: ``"standard"``, ``"peephole"`` or ``"ltm_stm"``.

    Returns
    -------
    TrainResult

    Raises
    ------
    numlstm.BackendUnavailableError
        If ``backend`` cannot run here.
    """
    train_seed, model_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    data_rng = np.random.default_rng(train_seed)
    model = AddingModel(hidden, np.random.default_rng(model_seed), dtype, backend, cell)
    optimizer = Adam(model.parameters(), lr=lr)
    losses = np.empty(steps)
    start = time.perf_counter()
    for step in range(steps):
        x, y = adding_problem(data_rng, batch_size, seq_len, dtype)
        model.zero_grad()
        losses[step] = model.loss_and_backward(x, y)
        grads = model.grads()
        if clip_norm is not None:
            clip_global_norm(grads, clip_norm)
        optimizer.lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        optimizer.step(grads)
        if progress is not None:
            progress(step + 1, losses[step])
    seconds = time.perf_counter() - start
    x_test, y_test = adding_problem(np.random.default_rng(test_seed), test_size, seq_len, dtype)
    test_mse = float(np.mean((model.predict(x_test) - y_test) ** 2))
    baseline_mse = float(np.mean((BASELINE_ANSWER - y_test) ** 2))
    return TrainResult(losses, test_mse, baseline_mse, seconds, model)


class Progress:
    """A progress report of a training run, as a callable ``progress(step, loss)``.

    On a terminal, one line redrawn in place (at most ten times a second) shows the step,
    the running loss (an exponential moving average) and the elapsed time. Elsewhere (a
    pipe, a file, CI logs) it prints one line at every tenth of the run instead.

    Parameters
    ----------
    steps : int
        The run's total steps.
    stream : file-like, optional
        Where to write; ``sys.stderr`` by default.
    """

    def __init__(self, steps, stream=None):
        self.steps = steps
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.interactive = bool(isatty and isatty())
        self.running_loss = None
        self.start = time.perf_counter()
        self.last_draw = -math.inf
        if self.interactive:
            # Shown at once: the first step may wait seconds for Numba to compile.
            self.stream.write(self._line(0, self.start))
            self.stream.flush()

    def __call__(self, step, loss):
        """Record the loss of ``step`` (counted from 1) and redraw if it is time."""
        smoothing = 0.98 if step > 1 else 0.0
        previous = loss if self.running_loss is None else self.running_loss
        self.running_loss = smoothing * previous + (1 - smoothing) * loss
        now = time.perf_counter()
        if self.interactive:
            if now - self.last_draw >= 0.1 or step == self.steps:
                self.last_draw = now
                self.stream.write(f"\r{self._line(step, now)}")
                if step == self.steps:
                    self.stream.write("\n")
                self.stream.flush()
        elif step == self.steps or step % max(1, self.steps // 10) == 0:
            self.stream.write(self._line(step, now) + "\n")
            self.stream.flush()

    def _line(self, step, now):
        width = 24
        filled = width * step // self.steps
        bar = "#" * filled + "-" * (width - filled)
        digits = len(str(self.steps))
        loss = "-" if self.running_loss is None else f"{self.running_loss:.4f}"
        return (
            f"[{bar}] step {step:>{digits}}/{self.steps}  loss {loss:<6}  {now - self.start:5.1f} s"
        )
