"""Gradient mode: whether a forward pass saves what its backward pass needs."""

from __future__ import annotations

import functools
import threading

_state = threading.local()


def is_grad_enabled():
    """Whether forward passes in this thread save a tape for ``backward``."""
    return getattr(_state, "enabled", True)


class no_grad:
    """Context manager (or decorator) for inference: forward passes save nothing.

    Inside it, a forward pass keeps no tape, so memory stays independent of the sequence
    length beyond the output, and ``backward`` cannot follow it. It applies to the
    current thread only, like :class:`torch.no_grad`.

    Examples
    --------
    >>> with numlstm.no_grad():
    ...     output, (h_n, c_n) = lstm(x)
    """

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.enabled = False
        return self

    def __exit__(self, *exc_info):
        _state.enabled = self._previous
        return False

    def __call__(self, function):
        @functools.wraps(function)
        def without_grad(*args, **kwargs):
            with no_grad():
                return function(*args, **kwargs)

        return without_grad
