"""``numlstm.LSTM``: a thin stateful shell over :mod:`numlstm.functional`."""

from __future__ import annotations

import warnings

import numpy as np

from . import backends, functional
from .equations import EQUATIONS, GATES
from .grad_mode import is_grad_enabled
from .params import LSTMSpec
from .validation import check_bool, check_int, check_probability


def _seed_rng(seed):
    if seed is not None:
        check_int(seed, "seed", 0)
    return np.random.default_rng(seed)


class LSTM:
    # The docstring is built below from numlstm.equations, so the docs cannot drift from
    # the code's gate order and equations.
    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        *,
        dtype="float32",
        backend="auto",
        seed=None,
        cell="standard",
    ):
        self.spec = LSTMSpec(
            input_size, hidden_size, num_layers, bias, bidirectional, proj_size, dtype, cell
        )
        self.batch_first = check_bool(batch_first, "batch_first")
        self.dropout = check_probability(dropout, "dropout")
        if self.dropout > 0 and self.spec.num_layers == 1:
            warnings.warn(
                f"dropout={self.dropout} acts between layers only, so it has no effect with "
                "num_layers=1",
                UserWarning,
                stacklevel=2,
            )
        self.backend = backends.check_backend_name(backend)
        if self.backend != "auto":
            backends.resolve(self.backend)
        self._rng = _seed_rng(seed)
        self._params = self.spec.init_params(self._rng)
        self.grads = {name: np.zeros_like(p) for name, p in self._params.items()}
        self.training = True
        self._tape = None

    # Hyper-parameters, read-only: they fix the parameters' shapes.
    input_size = property(lambda self: self.spec.input_size, doc="``I``")
    hidden_size = property(lambda self: self.spec.hidden_size, doc="``H``")
    num_layers = property(lambda self: self.spec.num_layers, doc="Stacked layers.")
    bias = property(lambda self: self.spec.bias, doc="Whether the gates have biases.")
    bidirectional = property(lambda self: self.spec.bidirectional, doc="``D = 2`` if True.")
    proj_size = property(lambda self: self.spec.proj_size, doc="``P``, or 0.")
    dtype = property(lambda self: self.spec.dtype, doc="float32 or float64.")
    cell = property(lambda self: self.spec.cell, doc="The cell variant.")

    def __repr__(self):
        options = [
            f"num_layers={self.num_layers}" if self.num_layers != 1 else "",
            "bias=False" if not self.bias else "",
            "batch_first=True" if self.batch_first else "",
            f"dropout={self.dropout}" if self.dropout else "",
            "bidirectional=True" if self.bidirectional else "",
            f"proj_size={self.proj_size}" if self.proj_size else "",
            f"dtype='{self.dtype}'",
            f"backend='{self.backend}'",
            f"cell='{self.cell}'" if self.cell != "standard" else "",
        ]
        text = ", ".join([str(self.input_size), str(self.hidden_size), *filter(None, options)])
        return f"LSTM({text})"

    def __call__(self, x, hx=None, lengths=None):
        """Same as :meth:`forward`."""
        return self.forward(x, hx, lengths)

    def forward(self, x, hx=None, lengths=None):
        """Run the model over a batch of sequences.

        Parameters
        ----------
        x : array
            ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, or ``(T, I)`` unbatched; a
            NumPy array (or a CUDA array) of the model's dtype.
        hx : tuple (h0, c0), optional
            Initial states, ``(num_layers * D, B, H_out)`` and
            ``(num_layers * D, B, hidden_size)`` (no B axis for unbatched input); zeros
            by default.
        lengths : sequence of int, optional
            Real steps of each sequence (``1 <= length <= T``, any order). Padded steps
            give zero outputs; ``h_n`` and ``c_n`` are each sequence's states at its last
            real step, as with PyTorch's packed sequences.

        Returns
        -------
        output : array
            ``(T, B, D * H_out)`` (or batch first, or unbatched).
        (h_n, c_n) : tuple of arrays
            Final states, shaped as ``hx``.

        Notes
        -----
        Outside :class:`numlstm.no_grad`, the call keeps what :meth:`backward` needs,
        replacing what an earlier call kept: that is released once the inputs have been
        checked, before the new pass allocates its own, so that a training loop holds one
        tape at a time (a call that fails its checks keeps the earlier one). In training
        mode, dropout masks are drawn from the model's generator (reproducible from
        ``seed``).
        """
        saving = is_grad_enabled()
        output, states, tape = functional.forward_checked(
            self.spec,
            self._params,
            x,
            hx,
            lengths,
            batch_first=self.batch_first,
            dropout=self.dropout if self.training else 0.0,
            dropout_masks=None,
            rng=self._rng,
            backend=self.backend,
            before_run=self._drop_tape if saving else None,
        )
        if saving:
            self._tape = tape
        return output, states

    def _drop_tape(self):
        """Release the tape of the last forward pass (see :meth:`forward`)."""
        self._tape = None

    def backward(self, d_output, d_hx=None):
        """Back-propagate through the last forward pass.

        Parameters
        ----------
        d_output : array or None
            Gradient of the loss at ``output`` (same shape and dtype); None if the loss
            reads only the final states.
        d_hx : tuple (d_h_n, d_c_n), optional
            Gradients at the final states, shaped as ``(h_n, c_n)``; zeros by default.

        Returns
        -------
        d_x : array
            Gradient at the input ``x`` (zeros at padded steps).
        (d_h0, d_c0) : tuple of arrays
            Gradients at the initial states.

        Notes
        -----
        The parameters' gradients are added into :attr:`grads`; call :meth:`zero_grad`
        between steps of an optimiser. The saved pass is kept, so calling ``backward``
        again with another ``d_output`` adds its gradients too.
        """
        if self._tape is None:
            raise ValueError(
                "backward() needs a forward pass that saved its tape: call the model on an "
                "input first, outside numlstm.no_grad()"
            )
        d_x, d_states, grads = functional.backward(self._tape, d_output, d_hx)
        for name, grad in grads.items():
            self.grads[name] += grad
        return d_x, d_states

    def zero_grad(self):
        """Set every accumulated gradient in :attr:`grads` to zero."""
        for grad in self.grads.values():
            grad[...] = 0

    def train(self, mode=True):
        """Set training mode (dropout between layers acts) or not; returns the model."""
        self.training = check_bool(mode, "mode")
        return self

    def eval(self):
        """Set evaluation mode (no dropout); returns the model."""
        return self.train(False)

    def named_parameters(self):
        """Iterate over ``(name, array)``: the live parameters, for in-place updates."""
        return iter(self._params.items())

    def parameters(self):
        """Iterate over the live parameter arrays, in PyTorch's order."""
        return iter(self._params.values())

    def state_dict(self):
        """A copy of every parameter, named and shaped as ``torch.nn.LSTM`` names them.

        ``{k: torch.from_numpy(v) for k, v in lstm.state_dict().items()}`` loads into a
        ``torch.nn.LSTM`` of the same hyper-parameters and dtype.
        """
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state_dict):
        """Copy parameters in from a dict named and shaped as :meth:`state_dict`'s.

        A ``torch.nn.LSTM`` state dict loads once turned into NumPy arrays:
        ``lstm.load_state_dict({k: v.numpy() for k, v in torch_lstm.state_dict().items()})``.

        Raises
        ------
        ValueError
            For a missing or unexpected key, or a wrong shape; the model is unchanged.
        TypeError
            For a value that is not an array of the model's dtype.
        """
        checked = self.spec.check_params(state_dict, "state_dict")
        self._params = {name: np.array(value, copy=True) for name, value in checked.items()}
        self._tape = None


def _lstm_docstring():
    def equation(label):
        return EQUATIONS[label].latex

    math = " \\\\\n            ".join(
        equation(label)
        for label in (
            "input-projection",
            "recurrent-projection",
            "input-gate",
            "forget-gate",
            "cell-candidate",
            "output-gate",
            "cell-update",
            "hidden-update",
        )
    )
    stacked = "|".join(f"W_{{i{g.symbol}}}" for g in GATES)
    stacked_hh = "|".join(f"W_{{h{g.symbol}}}" for g in GATES)
    gate_lines = "\n".join(
        f"    - rows ``{n}H:{n + 1}H``: ``{g.symbol}``, the {g.name} ({g.tutorial})"
        for n, g in enumerate(GATES)
    )
    return f"""A multi-layer LSTM with exact gradients, with the semantics of ``torch.nn.LSTM``.

    For each step ``t`` of each layer, the gate pre-activations ``a_t``, split into four
    blocks ``a^i_t, a^f_t, a^g_t, a^o_t``, give the gates and the two memories:

    .. math::

        \\begin{{array}}{{l}}
            {math}
        \\end{{array}}

    where ``x_t`` is the input (the event), ``h_t`` the hidden state (the short-term
    memory), ``c_t`` the cell state (the long-term memory), ``σ`` the sigmoid and ``⊙``
    the element-wise product. With ``proj_size > 0``,
    :math:`{equation("projection")}`. Layer ``k > 0`` reads the output of layer
    ``k - 1``, times a dropout mask in training mode when ``dropout > 0``.

    Each stacked weight holds the four gates in this order (``H = hidden_size``):

{gate_lines}

    so ``weight_ih_l{{k}}`` is :math:`({stacked})` and ``weight_hh_l{{k}}`` is
    :math:`({stacked_hh})`.

    Parameters
    ----------
    input_size : int
        ``I``, features of the input.
    hidden_size : int
        ``H``, features of the cell state.
    num_layers : int, default 1
        Stacked layers.
    bias : bool, default True
        Whether the gates have the biases ``b_ih`` and ``b_hh``.
    batch_first : bool, default False
        Whether input and output put the batch axis first, ``(B, T, ·)``. The states
        keep ``(num_layers * D, B, ·)``.
    dropout : float, default 0
        Dropout probability on the outputs of every layer but the last, in training mode.
    bidirectional : bool, default False
        Whether each layer also runs in reverse (``D = 2``); outputs are concatenated.
    proj_size : int, default 0
        If ``> 0``, the hidden state is projected to ``proj_size`` features
        (``H_out = proj_size < hidden_size``); otherwise ``H_out = hidden_size``.
    dtype : {{"float32", "float64"}}, default "float32"
        The dtype of parameters, inputs and outputs; nothing is cast silently.
    backend : {{"auto", "cpu", "cuda"}}, default "auto"
        Where the kernels run; ``"auto"`` follows :func:`numlstm.set_backend` or
        ``NUMLSTM_BACKEND`` where set, else picks by the kind of array passed in.
    seed : int, optional
        Seeds the initial parameters and the dropout masks.
    cell : {{"standard", "peephole", "ltm_stm"}}, default "standard"
        The cell variant. ``"standard"`` is the cell above (PyTorch's). ``"peephole"``
        adds peephole connections (Gers and Schmidhuber 2000, ONNX's ``P`` input):
        :math:`{equation("peephole-input-gate")}`,
        :math:`{equation("peephole-forget-gate")}`,
        :math:`{equation("peephole-output-gate")}`, with the weights
        ``peephole_l{{k}}`` ``(3, H)``, rows i, f, o. ``"ltm_stm"`` is the tutorial's cell,
        whose use gate has a layer of its own: :math:`{equation("kept-memory")}`,
        :math:`{equation("use-layer")}`, :math:`{equation("use-gate-output")}`, with
        ``weight_u_l{{k}}`` ``(H, H)`` and ``bias_u_l{{k}}`` ``(H,)`` (no projection).

    Attributes
    ----------
    grads : dict of str to array
        Accumulated gradients, with the keys and shapes of :meth:`state_dict`.
    training : bool
        Training mode (see :meth:`train`, :meth:`eval`).

    Notes
    -----
    Shapes (``T`` steps, ``B`` batch, ``D`` directions):

    - input ``x``: ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, or ``(T, I)``
    - ``h0``, ``h_n``: ``(num_layers * D, B, H_out)``; ``c0``, ``c_n``:
      ``(num_layers * D, B, hidden_size)`` (without ``B`` for unbatched input)
    - ``output``: ``(T, B, D * H_out)``, or ``(B, T, D * H_out)``, or ``(T, D * H_out)``
    - ``weight_ih_l0``: ``(4H, I)``; ``weight_ih_l{{k}}``, ``k > 0``: ``(4H, D * H_out)``
    - ``weight_hh_l{{k}}``: ``(4H, H_out)``; ``bias_ih_l{{k}}``, ``bias_hh_l{{k}}``: ``(4H,)``
    - ``weight_hr_l{{k}}``: ``(proj_size, H)``, with projection only

    The reverse direction's parameters carry the suffix ``_reverse``. Parameters start
    uniform in :math:`\\pm 1/\\sqrt{{H}}`, as PyTorch's do.

    Examples
    --------
    >>> lstm = numlstm.LSTM(8, 32, num_layers=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((50, 4, 8)).astype(np.float32)
    >>> output, (h_n, c_n) = lstm(x)
    >>> output.shape, h_n.shape
    ((50, 4, 32), (2, 4, 32))
    >>> d_x, (d_h0, d_c0) = lstm.backward(np.ones_like(output))
    """


LSTM.__doc__ = _lstm_docstring()
