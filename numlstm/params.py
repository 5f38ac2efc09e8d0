"""The shape of a stacked LSTM and its parameters, named as PyTorch names them."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from .backends import is_cuda_array
from .validation import (
    FLOAT_DTYPES,
    array_dtype,
    check_array,
    check_bool,
    check_cell,
    check_dtype,
    check_int,
    check_is_array,
    check_shape,
)

_NAME = re.compile(
    r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr|peephole|weight_u|bias_u)_l(\d+)(_reverse)?"
)


@functools.cache  # called for every parameter of every forward pass
def param_name(kind, layer, direction):
    """PyTorch's name of a parameter: ``weight_ih_l0``, ``bias_hh_l1_reverse``, ..."""
    return f"{kind}_l{layer}" + ("_reverse" if direction else "")


@dataclass(frozen=True)
class LSTMSpec:
    """The hyper-parameters that fix the parameters' names and shapes.

    Attributes
    ----------
    input_size : int
        ``I``, features of the input.
    hidden_size : int
        ``H``, units of the long-term memory (cell state).
    num_layers : int
        Stacked layers.
    bias : bool
        Whether the gates have the biases ``b_ih`` and ``b_hh``.
    bidirectional : bool
        Whether each layer also runs in reverse (``D = 2`` directions).
    proj_size : int
        ``P`` with projection (``0 < P < H``), else 0.
    dtype : numpy.dtype
        float32 or float64.
    cell : {"standard", "peephole", "ltm_stm"}
        The cell variant: the standard LSTM cell, with peephole connections
        (``peephole_l{k}``, ``(3, H)``, rows i, f, o), or the tutorial's LTM/STM cell with
        its use layer (``weight_u_l{k}`` ``(H, H)`` and, with bias, ``bias_u_l{k}``
        ``(H,)``; no projection).
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    bidirectional: bool = False
    proj_size: int = 0
    dtype: np.dtype | str = "float32"
    cell: str = "standard"

    def __post_init__(self):
        set_field = object.__setattr__
        set_field(self, "input_size", check_int(self.input_size, "input_size", 1))
        set_field(self, "hidden_size", check_int(self.hidden_size, "hidden_size", 1))
        set_field(self, "num_layers", check_int(self.num_layers, "num_layers", 1))
        set_field(self, "bias", check_bool(self.bias, "bias"))
        set_field(self, "bidirectional", check_bool(self.bidirectional, "bidirectional"))
        set_field(self, "proj_size", check_int(self.proj_size, "proj_size", 0))
        set_field(self, "dtype", check_dtype(self.dtype))
        set_field(self, "cell", check_cell(self.cell))
        if self.cell == "ltm_stm" and self.proj_size:
            raise ValueError(
                f"proj_size must be 0 with cell='ltm_stm' (its use gate has no projection), "
                f"got {self.proj_size}"
            )
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size ({self.hidden_size}), "
                f"got {self.proj_size}"
            )

    def describe(self):
        """The hyper-parameters in words, as ``LSTM(...)`` would be called."""
        options = [
            f"num_layers={self.num_layers}",
            f"bias={self.bias}",
            f"bidirectional={self.bidirectional}",
            f"proj_size={self.proj_size}",
            f"dtype='{self.dtype}'",
        ]
        if self.cell != "standard":
            options.append(f"cell='{self.cell}'")
        return f"LSTM({self.input_size}, {self.hidden_size}, {', '.join(options)})"

    @property
    def num_directions(self):
        """``D``: 2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """``H_out``: units of the short-term memory (hidden state), ``P`` or ``H``."""
        return self.proj_size or self.hidden_size

    def param_shapes(self):
        """Every parameter's name and shape, in PyTorch's order.

        Returns
        -------
        dict of str to tuple
            ``weight_ih_l{k}`` (4H, I or D*H_out), ``weight_hh_l{k}`` (4H, H_out),
            ``bias_ih_l{k}`` and ``bias_hh_l{k}`` (4H,), ``weight_hr_l{k}`` (H_out, H),
            then the cell's own: ``peephole_l{k}`` (3, H), or ``weight_u_l{k}`` (H, H) and
            ``bias_u_l{k}`` (H,); the reverse direction's with the suffix ``_reverse``.
        """
        four_h = 4 * self.hidden_size
        shapes = {}
        for layer in range(self.num_layers):
            n_in = self.input_size if layer == 0 else self.num_directions * self.output_size
            for direction in range(self.num_directions):
                shapes[param_name("weight_ih", layer, direction)] = (four_h, n_in)
                shapes[param_name("weight_hh", layer, direction)] = (four_h, self.output_size)
                if self.bias:
                    shapes[param_name("bias_ih", layer, direction)] = (four_h,)
                    shapes[param_name("bias_hh", layer, direction)] = (four_h,)
                if self.proj_size:
                    shapes[param_name("weight_hr", layer, direction)] = (
                        self.proj_size,
                        self.hidden_size,
                    )
                hidden = self.hidden_size
                if self.cell == "peephole":
                    shapes[param_name("peephole", layer, direction)] = (3, hidden)
                elif self.cell == "ltm_stm":
                    shapes[param_name("weight_u", layer, direction)] = (hidden, hidden)
                    if self.bias:
                        shapes[param_name("bias_u", layer, direction)] = (hidden,)
        return shapes

    def init_params(self, rng):
        """New parameters drawn as PyTorch draws them: uniform in ±1/sqrt(hidden_size).

        Parameters
        ----------
        rng : numpy.random.Generator

        Returns
        -------
        dict of str to numpy.ndarray
        """
        bound = 1.0 / np.sqrt(self.hidden_size)
        return {
            name: rng.uniform(-bound, bound, shape).astype(self.dtype)
            for name, shape in self.param_shapes().items()
        }

    def check_params(self, params, argument="params"):
        """Check a parameter dict against this spec; return it with C-contiguous arrays.

        Raises
        ------
        TypeError
            If ``params`` is not a dict, or a value is not an array of the spec's dtype.
        ValueError
            If a key is missing or unexpected, or an array has the wrong shape.
        """
        if not isinstance(params, dict):
            raise TypeError(
                f"{argument} must be a dict of arrays named as torch.nn.LSTM names them, "
                f"got {type(params).__name__}"
            )
        shapes = self.param_shapes()
        missing = [name for name in shapes if name not in params]
        unexpected = [name for name in params if name not in shapes]
        if missing or unexpected:
            raise ValueError(
                f"{argument} must have the keys of {self.describe()}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        for name, shape in shapes.items():
            key = f"{argument}[{name!r}]"
            check_shape(check_array(params[name], key, self.dtype, str(shape)), shape, key)
        # CUDA arrays stay where they are: the CUDA backend uses them in place.
        return {
            name: value if is_cuda_array(value) else np.ascontiguousarray(value)
            for name, value in ((name, params[name]) for name in shapes)
        }

    @classmethod
    def from_params(cls, params, argument="params"):
        """Infer the spec from parameters named as torch.nn.LSTM names them.

        Layers, directions, projection, bias and the cell (``peephole_l0`` for
        ``"peephole"``, ``weight_u_l0`` for ``"ltm_stm"``) follow from which names are present;
        sizes and dtype from ``weight_ih_l0``, ``weight_hh_l0`` and ``weight_hr_l0``.
        The parameters are then checked with :meth:`check_params`.

        Returns
        -------
        spec : LSTMSpec
        params : dict of str to numpy.ndarray
            The checked, C-contiguous parameters.
        """
        if not isinstance(params, dict):
            raise TypeError(
                f"{argument} must be a dict of arrays named as torch.nn.LSTM names them, "
                f"got {type(params).__name__}"
            )
        matches = [_NAME.fullmatch(name) if isinstance(name, str) else None for name in params]
        layers = [int(m.group(2)) for m in matches if m]
        for required in ("weight_ih_l0", "weight_hh_l0"):
            if required not in params:
                raise ValueError(f"{argument} has no {required!r}: got keys {list(params)}")
        w_ih, w_hh = params["weight_ih_l0"], params["weight_hh_l0"]
        check_is_array(w_ih, f"{argument}['weight_ih_l0']", "a floating-point NumPy array")
        dtype = array_dtype(w_ih)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{argument}['weight_ih_l0'] must be a float32 or float64 NumPy array, "
                f"got dtype {dtype}"
            )
        for name, value in (("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh)):
            if getattr(value, "ndim", None) != 2:
                raise ValueError(
                    f"{argument}[{name!r}] must be a 2-D array, got {type(value).__name__} "
                    f"of shape {getattr(value, 'shape', None)}"
                )
        if w_hh.shape[0] % 4:
            raise ValueError(
                f"{argument}['weight_hh_l0'] must have 4 * hidden_size rows (gates i, f, g, o), "
                f"got shape {w_hh.shape}"
            )
        hidden = w_hh.shape[0] // 4
        w_hr = params.get("weight_hr_l0")
        spec = cls(
            input_size=w_ih.shape[1],
            hidden_size=hidden,
            num_layers=max(layers) + 1,
            bias="bias_ih_l0" in params,
            bidirectional="weight_ih_l0_reverse" in params,
            proj_size=0 if w_hr is None else w_hr.shape[0],
            dtype=dtype,
            cell=_infer_cell(params),
        )
        return spec, spec.check_params(params, argument)

    def layer_weights(self, params, layer, direction):
        """The arrays one layer and direction computes with.

        Returns
        -------
        w_ih, w_hh : arrays
        b_ih, b_hh : arrays or None
            None without bias.
        w_hr : array or None
            None without projection.
        """
        return tuple(params.get(name) for name in _names(_KINDS, layer, direction))

    def cell_weights(self, params, layer, direction):
        """The cell variant's own arrays of one layer and direction.

        Returns
        -------
        peephole : array or None
            ``(3, H)``, rows i, f, o, for ``cell="peephole"``.
        w_u, b_u : arrays or None
            The use layer for ``cell="ltm_stm"`` (``b_u`` None without bias).
        """
        return tuple(params.get(name) for name in _names(_CELL_KINDS, layer, direction))


@functools.cache
def _names(kinds, layer, direction):
    """The names of ``kinds`` for one layer and direction (built once: every forward and
    backward call looks its weights up by them)."""
    return tuple(param_name(kind, layer, direction) for kind in kinds)


_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
_CELL_KINDS = ("peephole", "weight_u", "bias_u")


def _infer_cell(params):
    """The cell variant that the names in ``params`` belong to."""
    if "peephole_l0" in params:
        return "peephole"
    if "weight_u_l0" in params:
        return "ltm_stm"
    return "standard"
