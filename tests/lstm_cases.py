"""Random LSTM configurations and their arrays, shared by the property, gradient and parity tests.

A :class:`Case` is what Hypothesis draws: sizes, features and layout, plus a seed. Its
arrays (parameters, input, initial states, dropout masks, loss weights) come from a NumPy
generator seeded by it, so every example is reproducible from the printed ``Case`` and
shrinks over sizes and features rather than over thousands of floats. Parameters are drawn
element by element, so the four gates (and the two biases) always have distinct weights.

Loss used throughout: ``sum(output * d_output) + sum(h_n * d_h_n) + sum(c_n * d_c_n)``, so
``d_output``, ``d_h_n`` and ``d_c_n`` are both the loss weights and the gradients that
``backward`` receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from reference import init_params

import numlstm

#: The caller's layouts of ``x`` and ``output``.
LAYOUTS = ("time_major", "batch_first", "unbatched")


@dataclass(frozen=True)
class Case:
    """One drawn configuration of a stacked LSTM and of a call to it."""

    steps: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    proj_size: int
    bias: bool
    layout: str
    lengths: tuple | None
    with_hx: bool
    dropout: float
    seed: int
    cell: str = "standard"

    @property
    def batched(self):
        return self.layout != "unbatched"

    @property
    def batch_first(self):
        return self.layout == "batch_first"

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        return self.proj_size or self.hidden_size

    @property
    def width(self):
        """``D * H_out``, the features of the output."""
        return self.directions * self.output_size

    @property
    def real_lengths(self):
        """Each element's real steps (all ``T`` without ``lengths``)."""
        return self.lengths if self.lengths is not None else (self.steps,) * self.batch

    def lstm_kwargs(self):
        """Keyword arguments of ``numlstm.LSTM`` (and ``torch.nn.LSTM``) for this case."""
        return {
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "bidirectional": self.bidirectional,
            "proj_size": self.proj_size,
        }

    def numlstm_kwargs(self):
        """:meth:`lstm_kwargs` plus the cell, for ``numlstm.LSTM`` only."""
        return self.lstm_kwargs() | {"cell": self.cell}


@dataclass
class Arrays:
    """The arrays of one case, in the caller's layout (as numlstm.forward takes them).

    ``hx`` is None unless the case gives initial states. ``masks`` are the functional's
    dropout masks (shaped like the output); ``masks_time_major`` the same masks in the
    reference's time-major layout. Both are None without dropout.
    """

    params: dict
    x: np.ndarray
    hx: tuple | None
    masks: list | None
    masks_time_major: list | None
    d_output: np.ndarray
    d_h_n: np.ndarray
    d_c_n: np.ndarray

    @property
    def d_hx(self):
        return (self.d_h_n, self.d_c_n)


@st.composite
def cases(
    draw,
    *,
    max_steps=4,
    max_batch=3,
    max_size=3,
    max_layers=3,
    min_layers=1,
    min_steps=1,
    layouts=LAYOUTS,
    bidirectional=None,
    lengths=True,
    padded=False,
    dropout=True,
    with_hx=None,
    cells=("standard",),
):
    """A strategy for :class:`Case`.

    Parameters
    ----------
    max_steps, max_batch, max_size, max_layers, min_layers, min_steps : int
        Bounds of ``T``, ``B``, ``I`` and ``H``, and of the layers and steps.
    layouts : sequence of str
        Layouts to draw from (:data:`LAYOUTS`).
    bidirectional, with_hx : bool, optional
        Fixed, or drawn when None.
    lengths : bool
        Whether batched cases may carry ``lengths`` (drawn in any order).
    padded : bool
        Whether batched cases must carry lengths with at least one ``< T`` (then
        ``min_steps`` is at least 2).
    dropout : bool
        Whether multi-layer cases may carry fixed dropout masks.
    cells : sequence of str
        Cell variants to draw from (``"ltm_stm"`` has no projection).
    """
    cell = draw(st.sampled_from(cells))
    layout = draw(st.sampled_from(layouts))
    batched = layout != "unbatched"
    steps = draw(st.integers(max(min_steps, 2 if padded else 1), max_steps))
    batch = draw(st.integers(1, max_batch)) if batched else 1
    hidden_size = draw(st.integers(1, max_size))
    projection = hidden_size > 1 and cell != "ltm_stm"
    proj_size = draw(st.just(0) | st.integers(1, hidden_size - 1)) if projection else 0
    num_layers = draw(st.integers(min_layers, max_layers))
    drawn_lengths = None
    if batched and (padded or (lengths and draw(st.booleans()))):
        values = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        if padded:
            where = draw(st.integers(0, batch - 1))
            values[where] = draw(st.integers(1, steps - 1))
        drawn_lengths = tuple(values)
    masked = dropout and num_layers > 1 and draw(st.booleans())
    return Case(
        steps=steps,
        batch=batch,
        input_size=draw(st.integers(1, max_size)),
        hidden_size=hidden_size,
        num_layers=num_layers,
        bidirectional=draw(st.booleans()) if bidirectional is None else bidirectional,
        proj_size=proj_size,
        bias=draw(st.booleans()),
        layout=layout,
        lengths=drawn_lengths,
        with_hx=draw(st.booleans()) if with_hx is None else with_hx,
        dropout=draw(st.sampled_from([0.25, 0.5])) if masked else 0.0,
        seed=draw(st.integers(0, 2**32 - 1)),
        cell=cell,
    )


def to_caller_layout(time_major, case):
    """A time-major ``(T, B, F)`` array in the case's layout (a C-contiguous copy)."""
    if case.batch_first:
        return np.ascontiguousarray(time_major.transpose(1, 0, 2))
    if not case.batched:
        return np.ascontiguousarray(time_major[:, 0])
    return time_major.copy()


def time_axis(case):
    """The axis of time in the case's layout."""
    return 1 if case.batch_first else 0


def make_params(case, dtype=np.float64):
    """The case's parameters (PyTorch's initialisation, every entry drawn independently).

    Drawn in float64 and cast, so both dtypes of a case share the same values.
    """
    params = init_params(
        np.random.default_rng([case.seed, 0]),
        case.input_size,
        case.hidden_size,
        case.num_layers,
        case.bidirectional,
        case.proj_size,
        case.bias,
        cell=case.cell,
    )
    return {name: value.astype(dtype) for name, value in params.items()}


def make_arrays(case, dtype=np.float64):
    """Every array of the case, drawn in float64 and cast to ``dtype``.

    The same case gives the same values (up to rounding) in either dtype.
    """
    rng = np.random.default_rng([case.seed, 1])
    steps, batch, width = case.steps, case.batch, case.width
    rows = case.num_layers * case.directions
    state_batch = (batch,) if case.batched else ()
    x = to_caller_layout(rng.standard_normal((steps, batch, case.input_size)), case)
    hx = (
        rng.standard_normal((rows, *state_batch, case.output_size)),
        rng.standard_normal((rows, *state_batch, case.hidden_size)),
    )
    masks_tm = None
    if case.dropout:
        keep = 1.0 / (1.0 - case.dropout)
        masks_tm = [
            (rng.random((steps, batch, width)) >= case.dropout) * keep
            for _ in range(case.num_layers - 1)
        ]
    d_output = to_caller_layout(rng.standard_normal((steps, batch, width)), case)
    d_h_n = rng.standard_normal(hx[0].shape)
    d_c_n = rng.standard_normal(hx[1].shape)

    def cast(a):
        return a.astype(dtype)

    masks = None if masks_tm is None else [cast(to_caller_layout(m, case)) for m in masks_tm]
    if masks_tm is not None and not case.batched:
        masks_tm = [m[:, 0] for m in masks_tm]
    return Arrays(
        params=make_params(case, dtype),
        x=cast(x),
        hx=tuple(cast(a) for a in hx) if case.with_hx else None,
        masks=masks,
        masks_time_major=None if masks_tm is None else [cast(m) for m in masks_tm],
        d_output=cast(d_output),
        d_h_n=cast(d_h_n),
        d_c_n=cast(d_c_n),
    )


def zero_states(case, dtype=np.float64):
    """Zero initial states ``(h0, c0)`` of the case's shapes."""
    rows = case.num_layers * case.directions
    state_batch = (case.batch,) if case.batched else ()
    return (
        np.zeros((rows, *state_batch, case.output_size), dtype),
        np.zeros((rows, *state_batch, case.hidden_size), dtype),
    )


def forward_backward(case, arrays):
    """``numlstm.forward`` then ``numlstm.backward`` on a case's arrays.

    Returns
    -------
    dict of str to array
        ``output``, ``h_n``, ``c_n``, then the gradients ``d_x``, ``d_h0``, ``d_c0`` and
        ``d_<parameter name>`` for every parameter, in PyTorch's order.
    """
    output, (h_n, c_n), tape = numlstm.forward(
        arrays.x,
        arrays.params,
        arrays.hx,
        case.lengths,
        batch_first=case.batch_first,
        dropout_masks=arrays.masks,
    )
    d_x, (d_h0, d_c0), grads = numlstm.backward(tape, arrays.d_output, arrays.d_hx)
    results = {"output": output, "h_n": h_n, "c_n": c_n, "d_x": d_x, "d_h0": d_h0, "d_c0": d_c0}
    return results | {f"d_{name}": grad for name, grad in grads.items()}


def assert_close_float32(actual, expected, rtol, name="array"):
    """``|actual - expected| <= rtol * max(max|expected|, 1)``, for float32 results.

    Inputs, weights and loss weights here are of order one, so every sum inside the model
    has terms of order one, and float32 rounds each at an absolute ~1e-7. An array that is
    small only because its terms cancel (a gate pre-activation near zero makes ``c`` ~1e-4,
    say) keeps that absolute error, which relative to its own tiny magnitude is
    unbounded: measured up to 6e-5 for float32 against float64, and 8e-5 for numlstm
    against torch, over a few thousand cases. Flooring the scale at 1 bounds the error
    where it is absolute and leaves the check relative for larger arrays.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1.0)
    error = float(np.max(np.abs(actual - expected), initial=0.0))
    assert error <= rtol * scale, (
        f"{name}: max error {error:.3g} exceeds {rtol:g} x max(1, max magnitude {scale:.3g})"
    )
