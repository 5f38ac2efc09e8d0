"""The array namespace of the CUDA backend: Numba device arrays, and getting arrays onto them.

:mod:`numlstm.functional` runs the same orchestration on every backend through a small
namespace ``xp`` of NumPy-like functions. This module is that namespace for the CUDA
backend: each function takes and returns Numba device arrays. A NumPy array given to any
of them is copied to the device first (this is how ``d_output`` of a NumPy-in forward
pass, or the dropout masks drawn on the host, get there); any other CUDA array (CuPy,
PyTorch CUDA tensors: anything with ``__cuda_array_interface__``) is wrapped, not copied.

Parameters given as NumPy arrays are uploaded once and kept on the device
(:func:`device_parameter`): a cache keyed on the host array's identity, valid while the
host array still holds the bytes it held at upload (checked with one host-side comparison
per call, which costs about 0.4 ms per 4 MiB of weights, far less than the upload; in-place
updates such as ``param -= lr * grad`` are therefore seen).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
from numba import cuda, types

from . import is_cuda_array

#: Threads per block of the element-wise kernels.
THREADS = 256


def _is_numba_device_array(array):
    # Numba's device arrays (and the simulator's) carry this class attribute.
    return bool(getattr(type(array), "__cuda_ndarray__", False))


def to_device(array):
    """``array`` as a Numba device array: wrapped if on the device, copied if on the host."""
    if _is_numba_device_array(array):
        return array
    if is_cuda_array(array):
        return cuda.as_cuda_array(array)
    return cuda.to_device(np.ascontiguousarray(array))


def asnumpy(array):
    """A NumPy copy of a device array (a NumPy array is returned as it is)."""
    if isinstance(array, np.ndarray):
        return array
    return to_device(array).copy_to_host()


def _blocks(size):
    return max(1, (size + THREADS - 1) // THREADS)


@cuda.jit
def fill_kernel(out, value):
    """``out[:] = value`` for a 1-D array."""
    k = cuda.grid(1)
    if k < out.shape[0]:
        out[k] = value


@cuda.jit
def combine_kernel(a, b, out, multiply):
    """``out = a * b`` if ``multiply`` else ``a + b``, for 1-D arrays of one shape."""
    k = cuda.grid(1)
    if k < out.shape[0]:
        out[k] = a[k] * b[k] if multiply else a[k] + b[k]


@cuda.jit
def copy_kernel(src, dst, offset):
    """``dst[offset:offset + n] = src`` for 1-D arrays (``n`` the size of ``src``)."""
    k = cuda.grid(1)
    if k < src.shape[0]:
        dst[offset + k] = src[k]


@cuda.jit
def swap_leading_axes_kernel(src, dst):
    """``dst[j, i, :] = src[i, j, :]`` for 3-D arrays (``src`` may have any strides)."""
    k = cuda.grid(1)
    n0, n1, n2 = src.shape
    if k < n0 * n1 * n2:
        i = k // (n1 * n2)
        j = (k // n2) % n1
        m = k % n2
        dst[j, i, m] = src[i, j, m]


#: The kernels of this module, for the PTX test (which cross-checks the list against the
#: module's contents). ``signature(float_type)`` gives each one's argument types.
ARRAY_KERNELS = {
    fill_kernel: lambda f: (f[::1], f),
    combine_kernel: lambda f: (f[::1], f[::1], f[::1], types.boolean),
    copy_kernel: lambda f: (f[::1], f[::1], types.int64),
    swap_leading_axes_kernel: lambda f: (f[:, :, :], f[:, :, ::1]),
}


#: Arrays of size zero (no memory, nothing to write), kept by shape and dtype: the
#: kernels take them for absent operands, and allocating one costs as much as any other.
_EMPTY: dict[tuple, object] = {}


def empty(shape, dtype):
    """An uninitialised device array (arrays of size zero are shared)."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    dtype = np.dtype(dtype)
    if 0 not in shape:
        return cuda.device_array(shape, dtype)
    key = (shape, dtype)
    if key not in _EMPTY:
        if len(_EMPTY) >= 256:
            _EMPTY.clear()
        _EMPTY[key] = cuda.device_array(shape, dtype)
    return _EMPTY[key]


def full(shape, value, dtype):
    """A device array filled with ``value``."""
    out = empty(shape, dtype)
    if out.size:
        flat = out.reshape(out.size)
        fill_kernel[_blocks(out.size), THREADS](flat, flat.dtype.type(value))
    return out


def zeros(shape, dtype):
    """A device array of zeros."""
    return full(shape, 0, dtype)


def asarray(array, dtype=None):
    """``array`` on the device, of ``dtype`` (host arrays are cast, then copied)."""
    if _is_numba_device_array(array) or is_cuda_array(array):
        device = to_device(array)
        if dtype is not None and np.dtype(dtype) != device.dtype:
            raise TypeError(f"array must have dtype {np.dtype(dtype)}, got {device.dtype}")
        return device
    return to_device(np.asarray(array, dtype=dtype))


def ascontiguousarray(array):
    """``array`` on the device and C-contiguous (a copy only where it is not)."""
    device = to_device(array)
    if device.is_c_contiguous():
        return device
    out = empty(device.shape, device.dtype)
    out[:] = device  # Numba's strided device-to-device assignment kernel.
    return out


def copy(array):
    """A C-contiguous device copy of ``array``."""
    device = ascontiguousarray(array)
    out = empty(device.shape, device.dtype)
    if out.size:
        flat = (x.reshape(out.size) for x in (device, out))
        copy_kernel[_blocks(out.size), THREADS](*flat, 0)
    return out


def stack(arrays):
    """The arrays (of one shape) stacked along a new first axis, C-contiguous."""
    arrays = [ascontiguousarray(a) for a in arrays]
    shape = tuple(arrays[0].shape)
    out = empty((len(arrays), *shape), arrays[0].dtype)
    size = arrays[0].size
    if size:
        flat = out.reshape(out.size)
        for k, part in enumerate(arrays):
            copy_kernel[_blocks(size), THREADS](part.reshape(size), flat, k * size)
    return out


def reshape(array, shape):
    """``array`` on the device with a new shape (copied first if it is not contiguous)."""
    device = to_device(array)
    if tuple(device.shape) == tuple(shape):
        return device
    return ascontiguousarray(device).reshape(shape)


def swapaxes(array, axis1, axis2):
    """A C-contiguous copy of a 3-D ``array`` with its first two axes swapped."""
    if sorted((axis1, axis2)) != [0, 1]:
        raise ValueError(f"swapaxes swaps axes 0 and 1 only, got {axis1} and {axis2}")
    device = to_device(array)
    if device.ndim != 3:
        raise ValueError(f"swapaxes takes 3-D arrays, got shape {tuple(device.shape)}")
    n0, n1, n2 = device.shape
    out = empty((n1, n0, n2), device.dtype)
    if out.size:
        swap_leading_axes_kernel[_blocks(out.size), THREADS](device, out)
    return out


def _combine(a, b, multiply):
    a, b = ascontiguousarray(a), ascontiguousarray(b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    out = empty(a.shape, a.dtype)
    if out.size:
        flat = (x.reshape(out.size) for x in (a, b, out))
        combine_kernel[_blocks(out.size), THREADS](*flat, multiply)
    return out


def add(a, b):
    """``a + b`` for two arrays of one shape."""
    return _combine(a, b, False)


def multiply(a, b):
    """``a * b`` for two arrays of one shape."""
    return _combine(a, b, True)


def concatenate(arrays, axis):
    """The arrays joined along ``axis`` (their other axes equal), C-contiguous."""
    arrays = [to_device(a) for a in arrays]
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = empty(tuple(shape), arrays[0].dtype)
    start = 0
    for part in arrays:
        stop = start + part.shape[axis]
        out[(slice(None),) * axis + (slice(start, stop),)] = part
        start = stop
    return out


_LENGTHS: dict[bytes, object] = {}


def device_lengths(lengths):
    """A device copy of an int64 array of sequence lengths, kept for reuse.

    A batch's lengths rarely change between calls (all ``T`` without padding), and a
    copy from the host waits for the device; copies are kept by value (at most 64).
    """
    key = lengths.tobytes()
    device = _LENGTHS.get(key)
    if device is None:
        if len(_LENGTHS) >= 64:
            _LENGTHS.clear()
        device = _LENGTHS[key] = cuda.to_device(np.ascontiguousarray(lengths, np.int64))
    return device


def _byte_range(array):
    """The first and one-past-last byte an array's elements occupy."""
    interface = array.__cuda_array_interface__
    pointer = interface["data"][0]
    itemsize = np.dtype(interface["typestr"]).itemsize
    shape = interface["shape"]
    strides = interface["strides"] or np.cumprod((itemsize, *shape[:0:-1]))[::-1]
    low = pointer + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides, strict=True))
    high = pointer + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides, strict=True))
    return low, high + itemsize


def may_share_memory(a, b):
    """Whether two arrays' memory ranges overlap (False when either is on the host)."""
    if not (is_cuda_array(a) and is_cuda_array(b)):
        return False
    if 0 in a.shape or 0 in b.shape:
        return False
    low_a, high_a = _byte_range(a)
    low_b, high_b = _byte_range(b)
    return low_a < high_b and low_b < high_a


class _CachedParameter(NamedTuple):
    host: weakref.ref
    snapshot: np.ndarray
    device: object


_PARAMETERS: dict[int, _CachedParameter] = {}


def _forget(key, host):
    entry = _PARAMETERS.get(key)
    if entry is not None and entry.host is host:
        del _PARAMETERS[key]


def device_parameter(array):
    """A parameter on the device; NumPy parameters are uploaded once and then reused.

    A device copy of a NumPy array is kept while the array lives, and reused as long as
    the array holds the same values it held at upload (compared on the host); otherwise
    it is uploaded again. CUDA arrays are used in place.
    """
    if _is_numba_device_array(array) or is_cuda_array(array):
        return ascontiguousarray(array)
    key = id(array)
    entry = _PARAMETERS.get(key)
    if (
        entry is not None
        and entry.host() is array
        and entry.snapshot.shape == array.shape
        and entry.snapshot.dtype == array.dtype
        and np.array_equal(entry.snapshot, array)
    ):
        return entry.device
    snapshot = np.array(array, copy=True, order="C")
    host = weakref.ref(array, lambda ref: _forget(key, ref))
    _PARAMETERS[key] = _CachedParameter(host, snapshot, cuda.to_device(snapshot))
    return _PARAMETERS[key].device
