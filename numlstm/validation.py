"""Argument checks. Each failure names the argument, what was expected and what was given."""

from __future__ import annotations

import numbers

import numpy as np

from .backends import is_cuda_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_int(value, argument, minimum):
    """Return ``value`` as an int if it is an integer ``>= minimum``, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value, argument):
    """Return ``value`` as a bool if it is one, else raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{argument} must be True or False, got {value!r}")
    return bool(value)


def check_probability(value, argument):
    """Return ``value`` as a float if it lies in [0, 1], else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument} must be a number in [0, 1], got {value!r}")
    return float(value)


#: The cell variants, by the name ``cell=`` takes.
CELLS = ("standard", "peephole", "ltm_stm")


def check_cell(cell, argument="cell"):
    """Return ``cell`` if it names a cell variant of :data:`CELLS`, else raise ValueError."""
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, CELLS))}, got {cell!r}")
    return cell


def check_dtype(dtype, argument="dtype"):
    """Return the NumPy dtype for ``"float32"``/``"float64"`` (or their NumPy types)."""
    try:
        # np.dtype(None) is float64: an omitted dtype must not pass for one.
        resolved = None if dtype is None else np.dtype(dtype)
    except (TypeError, ValueError):
        resolved = None
    if resolved is None or resolved not in FLOAT_DTYPES:
        raise ValueError(f"{argument} must be 'float32' or 'float64', got {dtype!r}")
    return resolved


def array_dtype(array):
    """The NumPy dtype of a NumPy or CUDA array (``__cuda_array_interface__``)."""
    if isinstance(array, np.ndarray):
        return array.dtype
    return np.dtype(array.__cuda_array_interface__["typestr"])


def check_is_array(value, argument, expected):
    """Raise a TypeError unless ``value`` is a NumPy array or a CUDA array.

    ``expected`` describes what the argument should be, for the message.
    """
    if not (isinstance(value, np.ndarray) or is_cuda_array(value)):
        hint = ""
        if hasattr(value, "numpy") and hasattr(value, "detach"):
            hint = " (for a CPU torch tensor, pass tensor.detach().numpy())"
        raise TypeError(f"{argument} must be {expected}, got {type(value).__name__}{hint}")


def check_array(value, argument, dtype, shape_text):
    """Check that ``value`` is a NumPy or CUDA array of ``dtype``; return its shape.

    Parameters
    ----------
    value : object
        What the caller passed.
    argument : str
        Its name, for the error message.
    dtype : numpy.dtype
        The model's dtype; no other is accepted (nothing is cast silently).
    shape_text : str
        The expected shape, in words, for the error message.

    Raises
    ------
    TypeError
        If ``value`` is not an array, or has another dtype.
    """
    if not isinstance(value, np.ndarray):  # the message costs microseconds: only on error
        check_is_array(
            value,
            argument,
            f"a NumPy array or a CUDA array of shape {shape_text} and dtype {dtype}",
        )
    given = array_dtype(value)
    if given != dtype:
        if given in FLOAT_DTYPES:
            fix = f"convert it with .astype(np.{dtype}) or build the model with dtype='{given}'"
        else:
            fix = "numlstm computes in float32 or float64 only"
        raise TypeError(
            f"{argument} must have the model's dtype {dtype}, got an array of dtype {given}; {fix}"
        )
    return tuple(value.shape)


def check_shape(shape, expected, argument, shape_text=None):
    """Raise a ValueError unless ``shape == expected``.

    ``shape_text`` names the axes of the expected shape, such as ``"(T, B, I)"``.
    """
    if tuple(shape) != tuple(expected):
        named = f"{shape_text} = " if shape_text else ""
        raise ValueError(f"{argument} must have shape {named}{tuple(expected)}, got {tuple(shape)}")


def check_lengths(lengths, batch, steps):
    """Return ``lengths`` as an int64 array of ``batch`` values in ``[1, steps]``.

    Parameters
    ----------
    lengths : sequence of int, 1-D integer array, or None
        Real steps of each sequence. None means every sequence has all ``steps`` steps.
    batch, steps : int
        The batch size ``B`` and the padded length ``T`` of the input.
    """
    if lengths is None:
        return np.full(batch, steps, np.int64)
    if is_cuda_array(lengths):
        raise TypeError("lengths must be a host sequence of integers, got a CUDA array")
    try:
        values = np.asarray(lengths)
    except (TypeError, ValueError):
        raise ValueError(
            f"lengths must be a 1-D sequence of {batch} integers, got {lengths!r}"
        ) from None
    if values.ndim != 1:
        raise ValueError(
            f"lengths must be a 1-D sequence of {batch} integers (one per batch element), "
            f"got an array of shape {values.shape}"
        )
    if values.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got values of dtype {values.dtype}")
    if len(values) != batch:
        raise ValueError(
            f"lengths must have one entry per batch element: {batch} expected, got {len(values)}"
        )
    outside = np.flatnonzero((values < 1) | (values > steps))
    if outside.size:
        index = outside[0]
        raise ValueError(
            f"lengths must lie in [1, T] = [1, {steps}], got lengths[{index}] = {values[index]}"
        )
    return values.astype(np.int64)
