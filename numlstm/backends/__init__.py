"""Backend dispatch: the one place that decides where the kernels run.

A backend is a module that exposes the same kernel-level entry points,
``layer_forward(x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths, reverse, save)``,
``layer_backward(tape, d_y, d_h_n, d_c_n)`` (one layer, one direction, a padded batch with
lengths; see :mod:`numlstm.backends.cpu`) and
``run_directions(jobs, batch, loop_flops, weight_bytes)``, which runs a layer's two
directions (calls of those, independent of each other) at once or in turn, as suits the
backend; plus the array namespace ``xp`` that the shared
orchestration in :mod:`numlstm.functional` uses: NumPy on the CPU, and on other
backends a namespace with the NumPy functions ``add``, ``asarray``, ``ascontiguousarray``,
``concatenate``, ``copy``, ``empty``, ``may_share_memory``, ``multiply``, ``reshape``,
``stack``, ``swapaxes`` and ``zeros`` for its arrays. The states ``h0``, ``c0``,
``d_h_n`` and ``d_c_n`` may be None, for zeros; the states the entry points return are
arrays of their own (the caller gets them without a copy). Backend modules are imported
only when first used, so ``import numlstm`` works without numba-cuda or a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

#: Names a user may ask for. ``"auto"`` follows the process-wide default where one is set,
#: and otherwise picks ``"cuda"`` for CUDA arrays and ``"cpu"`` for the others.
BACKENDS = ("auto", "cpu", "cuda")

#: The environment variable that sets the process-wide default backend.
ENV_VAR = "NUMLSTM_BACKEND"

_default: str | None = None


class BackendStatus(NamedTuple):
    """Whether a backend can run on this machine, and why not where it cannot."""

    available: bool
    reason: str


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this machine cannot run."""


def check_backend_name(backend, argument="backend"):
    """Return ``backend`` if it is a known backend name, else raise.

    Raises
    ------
    TypeError
        If ``backend`` is not a string.
    ValueError
        If it is not one of :data:`BACKENDS`.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


def set_backend(backend):
    """Set the process-wide default backend (``"auto"``, ``"cpu"`` or ``"cuda"``).

    It overrides the environment variable ``NUMLSTM_BACKEND`` and applies wherever a
    model or call asks for ``"auto"`` (the default). ``set_backend(None)`` returns to
    the environment variable, or ``"auto"`` without it.
    """
    global _default
    _default = None if backend is None else check_backend_name(backend)


def get_backend():
    """The process-wide default: :func:`set_backend`'s, else ``NUMLSTM_BACKEND``, else auto."""
    if _default is not None:
        return _default
    from_env = os.environ.get(ENV_VAR)
    if from_env is None or from_env == "":
        return "auto"
    return check_backend_name(from_env, f"the environment variable {ENV_VAR}")


def _cpu_status():
    return BackendStatus(True, "numba @njit kernels on the CPU")


def _cuda_status():
    try:
        from numba import cuda
    except ImportError as error:  # pragma: no cover - depends on the numba build
        return BackendStatus(False, f"numba.cuda cannot be imported ({error})")
    try:
        importlib.import_module("numba_cuda")
    except ImportError:
        return BackendStatus(
            False, "numba-cuda is not installed (pip install 'numlstm[cuda]' brings it)"
        )
    if not cuda.is_available():
        return BackendStatus(False, "numba-cuda is installed, but no CUDA driver or GPU was found")
    from numba import config

    if config.ENABLE_CUDASIM:
        return BackendStatus(True, "numba-cuda kernels in the simulator (NUMBA_ENABLE_CUDASIM)")
    device = cuda.get_current_device()
    major, minor = device.compute_capability
    label = device.name.decode() if isinstance(device.name, bytes) else device.name
    return BackendStatus(True, f"numba-cuda kernels on {label} (sm_{major}{minor})")


_STATUS = {"cpu": _cpu_status, "cuda": _cuda_status}


def available_backends():
    """Which backends this machine can run, and why a missing one is missing.

    Returns
    -------
    dict of str to BackendStatus
        For ``"cpu"`` and ``"cuda"``: ``(available, reason)``.

    Examples
    --------
    >>> numlstm.available_backends()["cpu"].available
    True
    """
    return {name: status() for name, status in _STATUS.items()}


def is_cuda_array(array):
    """Whether ``array`` lives on a CUDA device (has ``__cuda_array_interface__``)."""
    return hasattr(array, "__cuda_array_interface__")


@functools.cache
def _cpu_module():
    return importlib.import_module(f"{__name__}.cpu")


def resolve(backend, arrays=()):
    """The backend module for a request.

    Parameters
    ----------
    backend : str
        ``"cpu"`` or ``"cuda"``; or ``"auto"``, which follows the process-wide default
        (:func:`get_backend`) and, where that is ``"auto"`` too, picks ``"cuda"`` when any
        of ``arrays`` is a CUDA array and ``"cpu"`` otherwise.
    arrays : iterable
        The call's array arguments.

    Returns
    -------
    module
        The backend module, with ``layer_forward``, ``layer_backward``,
        ``run_directions`` and ``xp``.

    Raises
    ------
    BackendUnavailableError
        If the backend cannot run here; the message says what is missing.
    """
    name = check_backend_name(backend)
    if name == "auto":
        name = get_backend()
    if name == "auto":
        name = "cuda" if any(is_cuda_array(a) for a in arrays) else "cpu"
    if name == "cpu":  # always available: keep every call's path short
        return _cpu_module()
    status = _STATUS[name]()
    if not status.available:
        raise BackendUnavailableError(f"the {name!r} backend is not available: {status.reason}")
    return importlib.import_module(f"{__name__}.{name}")
