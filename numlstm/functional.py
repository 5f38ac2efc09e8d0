"""The functional layer: a stacked LSTM's forward and backward on explicit parameters.

This is the orchestration every backend shares: layers, directions, dropout between
layers, projection, lengths, batch layouts and initial states. It calls the backend's
kernel-level entry points (one layer, one direction) and nothing else of it but the small
array namespace ``xp``. :class:`numlstm.LSTM` is a thin shell over :func:`forward` and
:func:`backward`.

Examples
--------
Parameters are a dict named as ``torch.nn.LSTM.state_dict()`` names them, for instance
``{k: v.numpy() for k, v in torch_lstm.state_dict().items()}``:

>>> output, (h_n, c_n), tape = numlstm.forward(x, params)
>>> d_x, (d_h0, d_c0), grads = numlstm.backward(tape, d_output)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import backends
from .grad_mode import is_grad_enabled
from .params import LSTMSpec, param_name
from .validation import check_array, check_bool, check_lengths, check_probability, check_shape


@dataclass
class Tape:
    """What a forward pass saved for its backward pass.

    Attributes
    ----------
    spec : LSTMSpec
        The model's hyper-parameters.
    backend : module
        The backend that ran the forward pass.
    layers : list of list
        Per layer, per direction, the backend's own tape.
    dropout_masks : list of arrays
        The masks applied to the inputs of layers 1 and up, in the kernels' (T, B, F)
        layout; empty without dropout.
    batched, batch_first : bool
        The caller's layout, to give ``d_x`` back in it.
    device : bool
        Whether the caller's input was a CUDA array: the gradients then stay on the
        device; otherwise a CUDA backend copies them to the host.
    """

    spec: LSTMSpec
    backend: object
    layers: list
    dropout_masks: list
    batched: bool
    batch_first: bool
    device: bool = False


def _to_caller_kind(xp, arrays, device):
    """The results as the kind of array the caller passed: host arrays for host input.

    A CUDA backend's namespace has ``asnumpy``; NumPy's results are host arrays already
    (``hasattr`` on NumPy's module alone took 0.9 us, an exception raised and caught).
    """
    if device or xp is np or not hasattr(xp, "asnumpy"):
        return arrays
    return [xp.asnumpy(a) for a in arrays]


def forward(
    x,
    params,
    hx=None,
    lengths=None,
    *,
    batch_first=False,
    dropout=0.0,
    dropout_masks=None,
    rng=None,
    backend="auto",
):
    """Run a stacked LSTM forward on explicit parameters.

    Parameters
    ----------
    x : array
        The input: ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, or ``(T, I)`` for
        one unbatched sequence. Of the parameters' dtype (float32 or float64).
    params : dict of str to array
        Parameters named and shaped as ``torch.nn.LSTM`` names them (``weight_ih_l0``,
        ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0``, with the suffix
        ``_reverse`` for the reverse direction), plus the cell variant's own:
        ``peephole_l0`` for ``cell="peephole"``, ``weight_u_l0`` (and ``bias_u_l0``) for
        ``cell="ltm_stm"`` (see :class:`numlstm.LSTMSpec`). Layers, directions, bias,
        projection and the cell are inferred from the names present.
    hx : tuple of two arrays, optional
        Initial states ``(h0, c0)``, shaped ``(num_layers * D, B, H_out)`` and
        ``(num_layers * D, B, hidden_size)`` (without the B axis for unbatched input).
        Zeros by default.
    lengths : sequence of int, optional
        Real steps of each sequence, ``1 <= length <= T``, in any order. Steps beyond a
        sequence's length are padding: their outputs are zeros, and the final states are
        those at each sequence's last real step, as with PyTorch's packed sequences.
    batch_first : bool
        Whether ``x`` (and the output) put the batch axis first.
    dropout : float
        Probability of zeroing each output of every layer but the last, as the next
        layer's input. Scaled by ``1 / (1 - dropout)``. Pass 0 for evaluation.
    dropout_masks : list of arrays, optional
        The ``num_layers - 1`` masks to multiply those outputs by, each shaped like the
        output (already scaled). Overrides ``dropout``; for reproducing a pass exactly.
    rng : numpy.random.Generator, optional
        Draws the dropout masks.
    backend : {"auto", "cpu", "cuda"}
        Where to run. ``"auto"`` follows the process-wide default
        (:func:`numlstm.set_backend`, ``NUMLSTM_BACKEND``) where one is set, and otherwise
        picks ``"cuda"`` for CUDA arrays and ``"cpu"`` for NumPy arrays.

    Returns
    -------
    output : array
        ``(T, B, D * H_out)`` (or ``(B, T, D * H_out)``, or ``(T, D * H_out)``): the last
        layer's short-term memory at every step, both directions concatenated.
    (h_n, c_n) : tuple of arrays
        The final states of every layer and direction, shaped as ``hx``.
    tape : Tape or None
        What :func:`backward` needs; None inside :class:`numlstm.no_grad`.
    """
    spec, params = LSTMSpec.from_params(params)
    return forward_checked(
        spec,
        params,
        x,
        hx,
        lengths,
        batch_first=check_bool(batch_first, "batch_first"),
        dropout=check_probability(dropout, "dropout"),
        dropout_masks=dropout_masks,
        rng=rng,
        backend=backend,
    )


def forward_checked(
    spec,
    params,
    x,
    hx,
    lengths,
    *,
    batch_first,
    dropout,
    dropout_masks,
    rng,
    backend,
    before_run=None,
):
    """:func:`forward` for parameters and options already checked against ``spec``.

    The arrays ``x``, ``hx``, ``lengths`` and ``dropout_masks`` are checked here;
    ``before_run``, if given, is called once they have passed, before the pass allocates
    anything (:class:`numlstm.LSTM` drops its previous tape there, so that the new one can
    take its memory).
    """
    states = tuple(hx) if isinstance(hx, (tuple, list)) else ()
    be = backends.resolve(backend, (x, *states))
    call = _prepare_call(spec, be.xp, x, hx, lengths, batch_first)
    masks = _prepare_masks(spec, be.xp, call, dropout, dropout_masks, rng)
    if before_run is not None:
        before_run()
    save = is_grad_enabled()
    if save and be.xp.may_share_memory(call.x, x):
        # The tape keeps the input for the weight gradient: keep our own copy, so that the
        # caller may reuse the array before calling backward.
        call.x = be.xp.copy(call.x)
    device = backends.is_cuda_array(x)
    output, (h_n, c_n), tape = run_forward(spec, params, be, call, masks, save)
    output, h_n, c_n = _to_caller_kind(be.xp, (output, h_n, c_n), device)
    if tape is not None:
        tape.device = device
    return output, (h_n, c_n), tape


@dataclass
class Call:
    """The inputs of one forward pass, in the kernels' layout.

    ``x`` is ``(T, B, I)``, ``h0`` and ``c0`` are ``(num_layers * D, B, ·)`` (or both None
    for zeros), all C-contiguous; ``lengths`` is ``(B,)`` int64. ``batched`` and
    ``batch_first`` record the caller's layout.
    """

    x: object
    h0: object
    c0: object
    lengths: np.ndarray
    batched: bool
    batch_first: bool

    @property
    def steps(self):
        """``T``."""
        return self.x.shape[0]

    @property
    def batch(self):
        """``B``."""
        return self.x.shape[1]


def _prepare_call(spec, xp, x, hx, lengths, batch_first):
    """Check the inputs of a forward pass and bring them to the kernels' layout."""
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    shape = check_array(x, "x", spec.dtype, f"{layout} or (T, I)")
    if len(shape) not in (2, 3):
        raise ValueError(
            f"x must be 3-D {layout}, or 2-D (T, I) for one unbatched sequence, got shape {shape}"
        )
    if shape[-1] != spec.input_size:
        raise ValueError(
            f"x must have input_size = {spec.input_size} features in its last axis, "
            f"got shape {shape}"
        )
    batched = len(shape) == 3
    if batched:
        steps, batch = (shape[1], shape[0]) if batch_first else shape[:2]
        x = xp.swapaxes(x, 0, 1) if batch_first else x
    else:
        steps, batch = shape[0], 1
        if lengths is not None:
            raise ValueError(
                "lengths applies to batched input only; for one unbatched sequence of "
                f"length n pass x[:n] (x has shape {shape})"
            )
    if steps == 0 or batch == 0:
        raise ValueError(f"x must have at least one step and one batch element, got shape {shape}")
    x = xp.ascontiguousarray(xp.reshape(x, (steps, batch, spec.input_size)))
    h0, c0 = _prepare_states(spec, xp, hx, batch, batched)
    lengths = check_lengths(lengths, batch, steps)
    return Call(x, h0, c0, lengths, batched, batch_first)


def _state_shapes(spec, batch, batched):
    """Shapes of (h, c) states as the caller sees them, with their description."""
    n = spec.num_layers * spec.num_directions
    if batched:
        return (
            ((n, batch, spec.output_size), "(num_layers * D, B, H_out)"),
            ((n, batch, spec.hidden_size), "(num_layers * D, B, hidden_size)"),
        )
    return (
        ((n, spec.output_size), "(num_layers * D, H_out)"),
        ((n, spec.hidden_size), "(num_layers * D, hidden_size)"),
    )


def _check_state_pair(spec, pair, argument, names, batch, batched):
    """Check a pair of state arrays (``hx`` or ``d_hx``); return them as given."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"{argument} must be a tuple of two arrays {names}, got {type(pair).__name__}"
            + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else "")
        )
    for value, name, (shape, text) in zip(
        pair, names, _state_shapes(spec, batch, batched), strict=True
    ):
        check_shape(check_array(value, name, spec.dtype, text), shape, name, text)
    return pair


def _prepare_states(spec, xp, hx, batch, batched):
    """``(h0, c0)`` in the kernels' layout, or ``(None, None)`` for zeros."""
    shapes = [shape for shape, _ in _state_shapes(spec, batch, batched=True)]
    if hx is None:
        return None, None  # the backends start from zeros
    pair = _check_state_pair(spec, hx, "hx", ("h0", "c0"), batch, batched)
    return tuple(
        xp.ascontiguousarray(xp.reshape(s, shape)) for s, shape in zip(pair, shapes, strict=True)
    )


def _output_width(spec):
    return spec.num_directions * spec.output_size


def _output_shape(spec, call):
    """The shape of ``output`` in the caller's layout, and its axes in words."""
    width = _output_width(spec)
    if not call.batched:
        return (call.steps, width), "(T, D * H_out)"
    if call.batch_first:
        return (call.batch, call.steps, width), "(B, T, D * H_out)"
    return (call.steps, call.batch, width), "(T, B, D * H_out)"


def _to_kernel_layout(xp, array, call, width):
    """A caller-layout ``(T, B, F)``/``(B, T, F)``/``(T, F)`` array in the kernels' layout."""
    if call.batched and call.batch_first:
        array = xp.swapaxes(array, 0, 1)
    return xp.ascontiguousarray(xp.reshape(array, (call.steps, call.batch, width)))


def _to_caller_layout(xp, array, batched, batch_first):
    """A kernel-layout ``(T, B, F)`` array in the caller's layout."""
    if not batched:
        return xp.reshape(array, (array.shape[0], array.shape[2]))
    if batch_first:
        return xp.ascontiguousarray(xp.swapaxes(array, 0, 1))
    return array


def _stack_states(xp, states):
    """The states of every layer and direction, ``(B, ·)`` arrays that the backends return
    fresh, as one ``(num_layers * D, B, ·)`` array (no copy for a single one)."""
    if len(states) == 1:
        return xp.reshape(states[0], (1, *states[0].shape))
    return xp.stack(states)


def _states_to_caller(xp, states, batched):
    if batched:
        return states
    return xp.reshape(states, (states.shape[0], states.shape[2]))


def _prepare_masks(spec, xp, call, dropout, dropout_masks, rng):
    """The dropout masks of layers 1 and up, in the kernels' layout (empty without dropout)."""
    width = _output_width(spec)
    if dropout_masks is not None:
        count = spec.num_layers - 1
        if not isinstance(dropout_masks, (list, tuple)) or len(dropout_masks) != count:
            raise ValueError(
                f"dropout_masks must be a list of num_layers - 1 = {count} arrays, got "
                f"{type(dropout_masks).__name__}"
                + (f" of length {len(dropout_masks)}" if hasattr(dropout_masks, "__len__") else "")
            )
        expected, text = _output_shape(spec, call)
        masks = []
        for k, mask in enumerate(dropout_masks):
            name = f"dropout_masks[{k}]"
            check_shape(check_array(mask, name, spec.dtype, text), expected, name, text)
            masks.append(_to_kernel_layout(xp, mask, call, width))
        return masks
    if dropout == 0.0 or spec.num_layers == 1:
        return []
    rng = np.random.default_rng() if rng is None else rng
    shape = (call.steps, call.batch, width)
    scale = 0.0 if dropout == 1.0 else 1.0 / (1.0 - dropout)
    return [
        xp.asarray((rng.random(shape) >= dropout) * scale, dtype=spec.dtype)
        for _ in range(spec.num_layers - 1)
    ]


def _recurrent_work(spec, x):
    """For ``x`` of shape ``(T, B, I)``: the FLOPs of one layer and direction's recurrent
    products, ``2 T B 4H P``, and the bytes of its ``W_hh`` (``4H x P``)."""
    weights = 4 * spec.hidden_size * spec.output_size
    return 2 * x.shape[0] * x.shape[1] * weights, weights * np.dtype(spec.dtype).itemsize


def run_forward(spec, params, be, call, masks, save):
    """Forward through every layer and direction (inputs already checked).

    Parameters
    ----------
    spec : LSTMSpec
    params : dict of str to array
        Checked parameters, on the backend's device.
    be : module
        The backend.
    call : Call
        The checked inputs, in the kernels' layout.
    masks : list of arrays
        Dropout masks for layers 1 and up, in the kernels' layout.
    save : bool
        Whether to keep the tape for :func:`backward`.

    Returns
    -------
    output, (h_n, c_n), tape
        As :func:`forward` returns them.
    """
    xp = be.xp
    directions = spec.num_directions
    h_n, c_n = [], []
    layer_input = call.x
    layer_tapes = []
    work = _recurrent_work(spec, call.x)
    for layer in range(spec.num_layers):
        if layer > 0 and masks:
            layer_input = xp.multiply(layer_input, masks[layer - 1])
        jobs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = spec.layer_weights(params, layer, direction)
            peephole, w_u, b_u = spec.cell_weights(params, layer, direction)
            if w_u is not None and b_u is None:
                b_u = xp.zeros(spec.hidden_size, spec.dtype)
            jobs.append(
                functools.partial(
                    be.layer_forward,
                    layer_input,
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                    w_hr,
                    None if call.h0 is None else call.h0[k],
                    None if call.c0 is None else call.c0[k],
                    call.lengths,
                    direction == 1,
                    save,
                    peephole=peephole,
                    w_u=w_u,
                    b_u=b_u,
                )
            )
        outputs, tapes = [], []
        for y, h, c, tape in be.run_directions(jobs, call.batch, *work):
            outputs.append(y)
            tapes.append(tape)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else xp.concatenate(outputs, axis=2)
        layer_tapes.append(tapes)
    output = _to_caller_layout(xp, layer_input, call.batched, call.batch_first)
    h_n = _states_to_caller(xp, _stack_states(xp, h_n), call.batched)
    c_n = _states_to_caller(xp, _stack_states(xp, c_n), call.batched)
    tape = None
    if save:
        tape = Tape(
            spec,
            be,
            layer_tapes,
            masks,
            call.batched,
            call.batch_first,
        )
    return output, (h_n, c_n), tape


def backward(tape, d_output, d_hx=None):
    """Backward of :func:`forward`: gradients for the input, initial states and parameters.

    Parameters
    ----------
    tape : Tape
        What the forward pass saved.
    d_output : array or None
        Gradient of the loss at ``output``, of its shape and dtype; None for zeros (when
        the loss reads only the final states).
    d_hx : tuple of two arrays, optional
        Gradients at the final states ``(d_h_n, d_c_n)``, shaped as ``(h_n, c_n)``;
        zeros by default.

    Returns
    -------
    d_x : array
        Gradient at ``x``, of its shape (zeros at padded steps).
    (d_h0, d_c0) : tuple of arrays
        Gradients at the initial states, shaped as ``(h_n, c_n)``.
    grads : dict of str to array
        Gradient of every parameter, named and shaped as the parameters.
    """
    if not isinstance(tape, Tape):
        raise TypeError(f"tape must be the Tape a forward pass returned, got {type(tape).__name__}")
    spec, be = tape.spec, tape.backend
    xp = be.xp
    first = tape.layers[0][0]
    call = Call(first.x, None, None, first.lengths, tape.batched, tape.batch_first)
    width = _output_width(spec)
    if d_output is None:
        d_output = xp.zeros((call.steps, call.batch, width), spec.dtype)
    else:
        expected, text = _output_shape(spec, call)
        check_shape(check_array(d_output, "d_output", spec.dtype, text), expected, "d_output", text)
        d_output = _to_kernel_layout(xp, d_output, call, width)
    shapes = [shape for shape, _ in _state_shapes(spec, call.batch, batched=True)]
    if d_hx is None:
        d_h_n = d_c_n = None  # the backends start from zeros
    else:
        pair = _check_state_pair(spec, d_hx, "d_hx", ("d_h_n", "d_c_n"), call.batch, call.batched)
        d_h_n, d_c_n = (xp.reshape(d, shape) for d, shape in zip(pair, shapes, strict=True))
    return _run_backward(tape, xp, d_output, d_h_n, d_c_n)


def _run_backward(tape, xp, d_output, d_h_n, d_c_n):
    spec, be = tape.spec, tape.backend
    directions, width = spec.num_directions, spec.output_size
    d_h0, d_c0 = [None] * len(tape.layers) * directions, [None] * len(tape.layers) * directions
    grads = {}
    d_above = d_output
    x = tape.layers[0][0].x
    batch, work = x.shape[1], _recurrent_work(spec, x)
    for layer in reversed(range(spec.num_layers)):
        jobs = []
        for direction in range(directions):
            k = layer * directions + direction
            d_y = d_above
            if directions > 1:
                d_y = xp.ascontiguousarray(
                    d_above[:, :, direction * width : (direction + 1) * width]
                )
            jobs.append(
                functools.partial(
                    be.layer_backward,
                    tape.layers[layer][direction],
                    d_y,
                    None if d_h_n is None else xp.ascontiguousarray(d_h_n[k]),
                    None if d_c_n is None else xp.ascontiguousarray(d_c_n[k]),
                )
            )
        d_input = None
        for direction, g in enumerate(be.run_directions(jobs, batch, *work)):
            k = layer * directions + direction
            d_input = g.d_x if d_input is None else xp.add(d_input, g.d_x)
            d_h0[k], d_c0[k] = g.d_h0, g.d_c0
            grads[param_name("weight_ih", layer, direction)] = g.d_w_ih
            grads[param_name("weight_hh", layer, direction)] = g.d_w_hh
            if spec.bias:
                grads[param_name("bias_ih", layer, direction)] = g.d_bias
                grads[param_name("bias_hh", layer, direction)] = xp.copy(g.d_bias)
            if spec.proj_size:
                grads[param_name("weight_hr", layer, direction)] = g.d_w_hr
            if spec.cell == "peephole":
                grads[param_name("peephole", layer, direction)] = g.d_peephole
            if spec.cell == "ltm_stm":
                grads[param_name("weight_u", layer, direction)] = g.d_w_u
                if spec.bias:
                    grads[param_name("bias_u", layer, direction)] = g.d_b_u
        if layer > 0 and tape.dropout_masks:
            d_input = xp.multiply(d_input, tape.dropout_masks[layer - 1])
        d_above = d_input
    d_x = _to_caller_layout(xp, d_above, tape.batched, tape.batch_first)
    d_h0 = _states_to_caller(xp, _stack_states(xp, d_h0), tape.batched)
    d_c0 = _states_to_caller(xp, _stack_states(xp, d_c0), tape.batched)
    names = list(spec.param_shapes())
    d_x, d_h0, d_c0, *ordered = _to_caller_kind(
        xp, (d_x, d_h0, d_c0, *(grads[name] for name in names)), tape.device
    )
    return d_x, (d_h0, d_c0), dict(zip(names, ordered, strict=True))
