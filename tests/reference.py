"""A plain NumPy LSTM: the oracle that every numlstm backend is tested against.

This module is deliberately slow and simple. It loops over batch elements and time steps
in Python and writes the LSTM equations exactly as they appear in the documentation, so
that it can be checked by reading it (and is checked against ``torch.nn.LSTM`` in
``tests/test_reference.py``). It does not import numlstm.

Semantics are those of ``torch.nn.LSTM``:

* parameters are named as in its ``state_dict`` (``weight_ih_l{k}``, ``weight_hh_l{k}``,
  ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, each with a ``_reverse`` twin
  for the reverse direction), and the four gates are stacked in the order (i, f, g, o);
* ``lengths`` behave as ``pack_padded_sequence(enforce_sorted=False)`` followed by the
  LSTM and ``pad_packed_sequence(total_length=T)``: padded steps give zero output, the
  forward direction ends at step ``length - 1`` and the reverse direction starts there;
* dropout between layers is given explicitly, as already scaled masks.

The standard cell, one step::

    a   = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh      (4 * hidden_size values)
    i   = σ(a_i),  f = σ(a_f),  g = tanh(a_g),  o = σ(a_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)                              (or W_hr (o * tanh(c_t)) with projection)

The peephole cell (``cell="peephole"``, Gers and Schmidhuber 2000) adds
``p = peephole_l{k}`` of shape (3, hidden_size), rows i, f, o::

    i   = σ(a_i + p_i * c_{t-1}),  f = σ(a_f + p_f * c_{t-1}),  g = tanh(a_g)
    c_t = f * c_{t-1} + i * g
    o   = σ(a_o + p_o * c_t),      h_t = o * tanh(c_t)

The tutorial's LTM/STM cell (``cell="ltm_stm"``), with ``W_u = weight_u_l{k}`` (H, H) and
``b_u = bias_u_l{k}`` (H,), in the tutorial's words (N, i, f, V are the g, i, f, o blocks)::

    N_t   = tanh(a_g),  i_t = σ(a_i),  f_t = σ(a_f),  V_t = σ(a_o)
    LTM_t = LTM_{t-1} * f_t + N_t * i_t
    U_t   = tanh(W_u (LTM_{t-1} * f_t) + b_u)
    STM_t = U_t * V_t

A cell variant is added by writing its step function, with the signature of
:func:`standard_step`, and registering it in :data:`CELLS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

__all__ = [
    "CELLS",
    "LSTMConfig",
    "direction_weights",
    "infer_config",
    "init_params",
    "lstm_forward",
    "param_names",
    "sigmoid",
    "standard_step",
]


# ---------------------------------------------------------------------------------------
# Gate nonlinearities and the cell step
# ---------------------------------------------------------------------------------------


def sigmoid(z):
    """Logistic function ``1 / (1 + exp(-z))``, without overflow for large ``|z|``.

    Parameters
    ----------
    z : ndarray
        Pre-activations.

    Returns
    -------
    ndarray
        ``σ(z)``, same shape and dtype as ``z``.
    """
    return expit(z)


def standard_step(x_t, h_prev, c_prev, w):
    """One step of the standard LSTM cell (PyTorch's, gate order i, f, g, o).

    Parameters
    ----------
    x_t : ndarray, shape (input_size,)
        Input at this step.
    h_prev : ndarray, shape (H_out,)
        Hidden state (short-term memory) after the previous step.
    c_prev : ndarray, shape (hidden_size,)
        Cell state (long-term memory) after the previous step.
    w : dict
        Weights of one layer and direction, as returned by :func:`direction_weights`:
        ``weight_ih`` (4H, I), ``weight_hh`` (4H, H_out), ``bias_ih`` (4H,),
        ``bias_hh`` (4H,), ``weight_hr`` (H_out, H) or None.

    Returns
    -------
    h_t : ndarray, shape (H_out,)
        New hidden state.
    c_t : ndarray, shape (hidden_size,)
        New cell state.
    """
    gates = w["weight_ih"] @ x_t + w["bias_ih"] + w["weight_hh"] @ h_prev + w["bias_hh"]
    a_i, a_f, a_g, a_o = np.split(gates, 4)
    i = sigmoid(a_i)  # input ("ignore") gate
    f = sigmoid(a_f)  # forget gate
    g = np.tanh(a_g)  # candidate memory
    o = sigmoid(a_o)  # output ("use") gate
    c_t = f * c_prev + i * g
    h_t = o * np.tanh(c_t)
    if w["weight_hr"] is not None:
        h_t = w["weight_hr"] @ h_t
    return h_t, c_t


def peephole_step(x_t, h_prev, c_prev, w):
    """One step of the peephole cell; ``w["peephole"]`` is (3, hidden_size), rows i, f, o.

    Otherwise as :func:`standard_step`.
    """
    gates = w["weight_ih"] @ x_t + w["bias_ih"] + w["weight_hh"] @ h_prev + w["bias_hh"]
    a_i, a_f, a_g, a_o = np.split(gates, 4)
    p_i, p_f, p_o = w["peephole"]
    i = sigmoid(a_i + p_i * c_prev)
    f = sigmoid(a_f + p_f * c_prev)
    g = np.tanh(a_g)
    c_t = f * c_prev + i * g
    o = sigmoid(a_o + p_o * c_t)
    h_t = o * np.tanh(c_t)
    if w["weight_hr"] is not None:
        h_t = w["weight_hr"] @ h_t
    return h_t, c_t


def ltm_stm_step(x_t, stm_prev, ltm_prev, w):
    """One step of the tutorial's LTM/STM cell, in the tutorial's names.

    ``w["weight_u"]`` (H, H) and ``w["bias_u"]`` (H,) are the use gate's own layer; the
    g, i, f, o blocks of the stacked weights are the tutorial's N, i, f, V.
    """
    event_and_stm = w["weight_ih"] @ x_t + w["bias_ih"] + w["weight_hh"] @ stm_prev + w["bias_hh"]
    a_i, a_f, a_n, a_v = np.split(event_and_stm, 4)
    learn_n = np.tanh(a_n)  # learn gate: the new information
    ignore_i = sigmoid(a_i)  # learn gate: the ignore factor
    forget_f = sigmoid(a_f)  # forget gate
    kept = ltm_prev * forget_f  # what the forget gate keeps of the long-term memory
    ltm = kept + learn_n * ignore_i  # remember gate
    use_u = np.tanh(w["weight_u"] @ kept + w["bias_u"])  # use gate: its own layer
    use_v = sigmoid(a_v)
    stm = use_u * use_v
    return stm, ltm


#: Cell variants by name. Each maps ``(x_t, h_prev, c_prev, w) -> (h_t, c_t)``.
CELLS = {"standard": standard_step, "peephole": peephole_step, "ltm_stm": ltm_stm_step}


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LSTMConfig:
    """Hyper-parameters of an LSTM, as inferred from its parameter dict."""

    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    proj_size: int
    bias: bool
    cell: str = "standard"

    @property
    def num_directions(self) -> int:
        """D: 2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """H_out: ``proj_size`` if there is a projection, else ``hidden_size``."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def layer_input_size(self, layer: int) -> int:
        """Width of the input of ``layer``: ``input_size``, then ``D * H_out``."""
        return self.input_size if layer == 0 else self.num_directions * self.output_size


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


def param_names(num_layers, bidirectional=False, proj_size=0, bias=True, cell="standard"):
    """Parameter names in PyTorch's ``state_dict`` order, then the cell's own per direction.

    Parameters
    ----------
    num_layers : int
    bidirectional : bool
    proj_size : int
    bias : bool
    cell : str

    Returns
    -------
    list of str
    """
    names = []
    for layer in range(num_layers):
        for direction in range(2 if bidirectional else 1):
            s = _suffix(layer, direction)
            names += [f"weight_ih{s}", f"weight_hh{s}"]
            if bias:
                names += [f"bias_ih{s}", f"bias_hh{s}"]
            if proj_size > 0:
                names.append(f"weight_hr{s}")
            if cell == "peephole":
                names.append(f"peephole{s}")
            if cell == "ltm_stm":
                names += [f"weight_u{s}"] + ([f"bias_u{s}"] if bias else [])
    return names


def _expected_shapes(cfg: LSTMConfig):
    h, h_out = cfg.hidden_size, cfg.output_size
    shapes = {}
    for layer in range(cfg.num_layers):
        for direction in range(cfg.num_directions):
            s = _suffix(layer, direction)
            shapes[f"weight_ih{s}"] = (4 * h, cfg.layer_input_size(layer))
            shapes[f"weight_hh{s}"] = (4 * h, h_out)
            if cfg.bias:
                shapes[f"bias_ih{s}"] = (4 * h,)
                shapes[f"bias_hh{s}"] = (4 * h,)
            if cfg.proj_size > 0:
                shapes[f"weight_hr{s}"] = (cfg.proj_size, h)
            if cfg.cell == "peephole":
                shapes[f"peephole{s}"] = (3, h)
            if cfg.cell == "ltm_stm":
                shapes[f"weight_u{s}"] = (h, h)
                if cfg.bias:
                    shapes[f"bias_u{s}"] = (h,)
    return shapes


def infer_config(params) -> LSTMConfig:
    """Infer the LSTM's hyper-parameters from its parameter dict, and check the dict.

    Parameters
    ----------
    params : dict of str to ndarray
        Named as ``torch.nn.LSTM.state_dict()``.

    Returns
    -------
    LSTMConfig

    Raises
    ------
    ValueError
        If names are missing or unexpected, or shapes do not fit together.
    """
    if "weight_ih_l0" not in params or "weight_hh_l0" not in params:
        raise ValueError(f"params must contain weight_ih_l0 and weight_hh_l0, got {list(params)}")
    num_layers = 0
    while f"weight_ih_l{num_layers}" in params:
        num_layers += 1
    w_hh = np.shape(params["weight_hh_l0"])
    cfg = LSTMConfig(
        input_size=np.shape(params["weight_ih_l0"])[1],
        hidden_size=w_hh[0] // 4,
        num_layers=num_layers,
        bidirectional="weight_ih_l0_reverse" in params,
        proj_size=np.shape(params["weight_hr_l0"])[0] if "weight_hr_l0" in params else 0,
        bias="bias_ih_l0" in params,
        cell="peephole"
        if "peephole_l0" in params
        else "ltm_stm"
        if "weight_u_l0" in params
        else "standard",
    )
    expected = _expected_shapes(cfg)
    if set(params) != set(expected):
        raise ValueError(
            f"params: expected keys {sorted(expected)}, got {sorted(params)} "
            f"(missing {sorted(set(expected) - set(params))}, "
            f"unexpected {sorted(set(params) - set(expected))})"
        )
    for name, shape in expected.items():
        if tuple(np.shape(params[name])) != shape:
            raise ValueError(
                f"params[{name!r}]: expected shape {shape}, got {np.shape(params[name])}"
            )
    return cfg


def direction_weights(params, cfg: LSTMConfig, layer: int, direction: int, dtype):
    """The weights of one layer and one direction, with generic names.

    Missing biases (``bias=False``) become zeros; a missing projection becomes None.

    Parameters
    ----------
    params : dict of str to ndarray
    cfg : LSTMConfig
    layer : int
    direction : int
        0 for forward, 1 for reverse.
    dtype : numpy dtype
        Dtype to compute in.

    Returns
    -------
    dict
        Keys ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``, ``weight_hr``, and the
        cell's own: ``peephole``, or ``weight_u`` and ``bias_u`` (zeros without bias).
    """
    s = _suffix(layer, direction)
    zeros = np.zeros(4 * cfg.hidden_size, dtype=dtype)
    own = {}
    if cfg.cell == "peephole":
        own["peephole"] = np.asarray(params[f"peephole{s}"], dtype=dtype)
    if cfg.cell == "ltm_stm":
        own["weight_u"] = np.asarray(params[f"weight_u{s}"], dtype=dtype)
        own["bias_u"] = (
            np.asarray(params[f"bias_u{s}"], dtype=dtype)
            if cfg.bias
            else np.zeros(cfg.hidden_size, dtype=dtype)
        )
    return own | {
        "weight_ih": np.asarray(params[f"weight_ih{s}"], dtype=dtype),
        "weight_hh": np.asarray(params[f"weight_hh{s}"], dtype=dtype),
        "bias_ih": np.asarray(params[f"bias_ih{s}"], dtype=dtype) if cfg.bias else zeros,
        "bias_hh": np.asarray(params[f"bias_hh{s}"], dtype=dtype) if cfg.bias else zeros,
        "weight_hr": (
            np.asarray(params[f"weight_hr{s}"], dtype=dtype) if cfg.proj_size > 0 else None
        ),
    }


def init_params(
    rng,
    input_size,
    hidden_size,
    num_layers=1,
    bidirectional=False,
    proj_size=0,
    bias=True,
    dtype=np.float64,
    cell="standard",
):
    """Random LSTM parameters, uniform in ``(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``.

    This is PyTorch's default initialisation. Every entry is drawn independently, so the
    four gates (and the two biases) have distinct weights.

    Parameters
    ----------
    rng : numpy.random.Generator
    input_size, hidden_size : int
    num_layers : int
    bidirectional : bool
    proj_size : int
        0 for no projection.
    bias : bool
    dtype : numpy dtype
    cell : str
        A key of :data:`CELLS`; its own parameters are drawn the same way.

    Returns
    -------
    dict of str to ndarray
        Named and ordered as ``torch.nn.LSTM.state_dict()``.
    """
    if not (proj_size == 0 or 0 < proj_size < hidden_size):
        raise ValueError(f"proj_size must be 0 or in [1, hidden_size), got {proj_size}")
    cfg = LSTMConfig(input_size, hidden_size, num_layers, bidirectional, proj_size, bias, cell)
    bound = 1.0 / np.sqrt(hidden_size)
    shapes = _expected_shapes(cfg)
    names = param_names(num_layers, bidirectional, proj_size, bias, cell)
    return {name: rng.uniform(-bound, bound, size=shapes[name]).astype(dtype) for name in names}


# ---------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------


def run_sequence(x_seq, h0, c0, w, step):
    """Run one direction of one layer over one sequence, from ``(h0, c0)``.

    Parameters
    ----------
    x_seq : ndarray, shape (n, input_size)
        The real (unpadded) steps, in the order they are processed.
    h0 : ndarray, shape (H_out,)
    c0 : ndarray, shape (hidden_size,)
    w : dict
        See :func:`direction_weights`.
    step : callable
        The cell, e.g. :func:`standard_step`.

    Returns
    -------
    hs : ndarray, shape (n, H_out)
        Hidden state after each step, in processing order.
    h_last, c_last : ndarray
        The states after the last step.
    """
    h_prev, c_prev = h0, c0
    hs = []
    for x_t in x_seq:
        h_prev, c_prev = step(x_t, h_prev, c_prev, w)
        hs.append(h_prev)
    return np.stack(hs), h_prev, c_prev


def run_layer(x, lengths, h0, c0, weights, step):
    """Run one layer (all its directions) over a padded, time-major batch.

    Parameters
    ----------
    x : ndarray, shape (T, B, I)
    lengths : sequence of int, length B
    h0 : ndarray, shape (D, B, H_out)
    c0 : ndarray, shape (D, B, hidden_size)
    weights : list of dict
        One per direction, see :func:`direction_weights`.
    step : callable

    Returns
    -------
    output : ndarray, shape (T, B, D * H_out)
        Zero at padded steps.
    h_n : ndarray, shape (D, B, H_out)
    c_n : ndarray, shape (D, B, hidden_size)
    """
    T, B, _ = x.shape
    h_out = h0.shape[-1]
    output = np.zeros((T, B, len(weights) * h_out), dtype=x.dtype)
    h_n = np.zeros_like(h0)
    c_n = np.zeros_like(c0)
    for b in range(B):
        n = lengths[b]
        x_real = x[:n, b]
        for d, w in enumerate(weights):
            out_cols = slice(d * h_out, (d + 1) * h_out)
            if d == 0:  # forward: steps 0, 1, ..., n-1
                hs, h_n[d, b], c_n[d, b] = run_sequence(x_real, h0[d, b], c0[d, b], w, step)
                output[:n, b, out_cols] = hs
            else:  # reverse: steps n-1, ..., 1, 0
                hs, h_n[d, b], c_n[d, b] = run_sequence(x_real[::-1], h0[d, b], c0[d, b], w, step)
                output[:n, b, out_cols] = hs[::-1]
    return output, h_n, c_n


def _check_shape(name, array, expected):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(array.shape)}")


def lstm_forward(
    x,
    params,
    hx=None,
    lengths=None,
    *,
    batch_first=False,
    dropout_masks=None,
    cell="standard",
):
    """Multi-layer, optionally bidirectional LSTM forward pass, as ``torch.nn.LSTM``.

    Parameters
    ----------
    x : ndarray
        ``(T, B, I)``, or ``(B, T, I)`` with ``batch_first``, or unbatched ``(T, I)``.
        The computation runs in ``x.dtype``.
    params : dict of str to ndarray
        Named as ``torch.nn.LSTM.state_dict()``; the configuration (layers, directions,
        hidden size, projection, bias) is inferred from it.
    hx : tuple of ndarray, optional
        ``(h0, c0)``, shapes ``(L*D, B, H_out)`` and ``(L*D, B, hidden_size)`` (without
        the B axis for unbatched input; never batch-first). Index ``k*D + d`` is layer
        ``k``, direction ``d``. None means zeros.
    lengths : sequence of int, optional
        Real length of each batch element, ``1 <= length <= T``, in any order. None means
        all ``T``.
    batch_first : bool
        Whether ``x`` and ``output`` are ``(B, T, ...)``.
    dropout_masks : list of ndarray, optional
        ``num_layers - 1`` masks, each of shape ``(T, B, D*H_out)`` (time-major even with
        ``batch_first``; ``(T, D*H_out)`` for unbatched input), already scaled. The input
        of layer ``k+1`` is ``output_k * dropout_masks[k]``.
    cell : str
        Cell variant, a key of :data:`CELLS`. Its own parameters must be in ``params``.

    Returns
    -------
    output : ndarray
        ``(T, B, D*H_out)`` (or ``(B, T, D*H_out)``, or ``(T, D*H_out)``): the last
        layer's hidden states, zero at padded steps.
    (h_n, c_n) : tuple of ndarray
        Final states, shaped as ``hx``.
    """
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {cell!r}")
    step = CELLS[cell]
    cfg = infer_config(params)
    if cfg.cell != cell:
        raise ValueError(f"params: names of the {cfg.cell!r} cell, but cell={cell!r}")
    L, D, H, H_out = cfg.num_layers, cfg.num_directions, cfg.hidden_size, cfg.output_size

    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"x: expected 2 or 3 dimensions, got shape {x.shape}")
    unbatched = x.ndim == 2
    if unbatched:
        x = x[:, None, :]
    elif batch_first:
        x = x.transpose(1, 0, 2)
    T, B, input_size = x.shape
    dtype = x.dtype
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"x: expected a floating-point dtype, got {dtype}")
    if input_size != cfg.input_size:
        raise ValueError(f"x: expected input size {cfg.input_size}, got {input_size}")

    if hx is None:
        h0 = np.zeros((L * D, B, H_out), dtype=dtype)
        c0 = np.zeros((L * D, B, H), dtype=dtype)
    else:
        h0, c0 = (np.asarray(a, dtype=dtype) for a in hx)
        if unbatched:
            h0, c0 = h0[:, None, :], c0[:, None, :]
        _check_shape("h0", h0, (L * D, B, H_out))
        _check_shape("c0", c0, (L * D, B, H))

    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    if len(lengths) != B:
        raise ValueError(f"lengths: expected {B} values, got {len(lengths)}")
    if any(not 1 <= n <= T for n in lengths):
        raise ValueError(f"lengths: expected values in [1, {T}], got {lengths}")

    if dropout_masks is None:
        dropout_masks = [None] * (L - 1)
    if len(dropout_masks) != L - 1:
        raise ValueError(f"dropout_masks: expected {L - 1} masks, got {len(dropout_masks)}")

    layer_input = x
    h_n = np.zeros_like(h0)
    c_n = np.zeros_like(c0)
    for k in range(L):
        weights = [direction_weights(params, cfg, k, d, dtype) for d in range(D)]
        rows = slice(k * D, (k + 1) * D)
        output, h_n[rows], c_n[rows] = run_layer(
            layer_input, lengths, h0[rows], c0[rows], weights, step
        )
        if k < L - 1 and dropout_masks[k] is not None:
            mask = np.asarray(dropout_masks[k], dtype=dtype)
            if unbatched:
                mask = mask[:, None, :]
            _check_shape(f"dropout_masks[{k}]", mask, output.shape)
            output = output * mask
        layer_input = output

    if unbatched:
        return output[:, 0], (h_n[:, 0], c_n[:, 0])
    if batch_first:
        output = output.transpose(1, 0, 2)
    return output, (h_n, c_n)
