"""Memory that the CPU backend's calls take again from one call to the next.

A training step allocates its tape, the gate gradients and its outputs afresh: several
``T x B x 4H`` arrays. When they are released, the C library gives large free blocks back
to the operating system (glibc: a heap top larger than twice the largest block freed, up
to 64 MB), and the next step's arrays take new pages, each of which the kernel zeroes on
its first touch. Measured here (``python bench/training_loop.py --processes 5``, a loop
of ``LSTM`` training steps, float32), without the pool: (T, B, I, H) = (50, 16, 32, 64)
1.32 ms a step with 418 page faults, against 0.80 ms and none with it; (100, 64, 256, 256)
81 ms with 2047 faults, against 73 ms.

:class:`BufferPool` keeps the raw buffers it has handed out, and hands one out again once
no array refers to it any more: an array made on a buffer (:func:`._packed.aligned_empty`),
and every view of it, holds a reference to it, so a buffer referred to by the pool alone
is free, whatever has happened to the arrays that used it. Nothing is reused while any
view, NumPy's or Numba's, is alive. Buffers under :data:`POOL_MIN_BYTES` bypass the pool.
It holds at most :data:`POOL_BYTES` in :data:`POOL_MAX_BUFFERS` buffers, in use or idle,
so that no more than that stays allocated after the arrays are gone; a buffer beyond
either is handed out untracked, and freed as any array.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

#: Bytes of buffers the pool holds at most, in use or idle: idle ones go first, least
#: recently taken first, to make room for a new one. 256 MiB holds every buffer of a
#: training step up to float32 (T, B, I, H) = (100, 64, 256, 256) twice over (85 MB a
#: step, outputs included).
POOL_BYTES = 1 << 28
#: Buffers the pool holds at most, in use or idle: each request looks through them, so a
#: caller that keeps many outputs (a list of every batch's predictions) must not make every
#: call slower; beyond, as beyond :data:`POOL_BYTES`, a new buffer is handed out untracked.
#: A training step of three bidirectional layers takes about 50.
POOL_MAX_BUFFERS = 128
#: Smaller requests bypass the pool: the C library serves them from its free lists, which
#: it keeps (glibc gives back only a heap top larger than twice the largest block freed,
#: and maps blocks from 128 KB on by themselves at first), so they cost no page faults,
#: and the pool's bookkeeping (about 1 us a buffer) would cost more than it saves.
POOL_MIN_BYTES = 1 << 17
#: An idle buffer serves a request of this fraction of its size or more (sequences of
#: varying lengths reuse the buffers of longer ones); a smaller request allocates.
REUSE_MIN_FRACTION = 0.75


def _references(buffers, k):
    return sys.getrefcount(buffers[k])


def _idle_references():
    """What :func:`_references` counts for a buffer that only the pool refers to (the
    pool's list, the call's argument and ``getrefcount``'s own: CPython 3.11 counts 2)."""
    buffers = [np.empty(1, np.uint8)]
    return _references(buffers, 0)


_IDLE = _idle_references()


class BufferPool:
    """Raw ``uint8`` buffers, handed out again once nothing refers to them.

    Parameters
    ----------
    max_bytes : int
        Bytes of buffers held at most, in use or idle.
    min_bytes : int
        Requests below this many bytes get a new buffer, which the pool does not keep.
    max_buffers : int
        Buffers held at most, in use or idle.
    """

    def __init__(self, max_bytes, min_bytes=0, max_buffers=POOL_MAX_BUFFERS):
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.max_buffers = max_buffers
        self._buffers = []  # least recently taken first, in use or idle
        self._bytes = 0
        self._lock = threading.Lock()

    def new_lock(self):
        """Replace the lock (in a forked child, which may have been forked while another
        thread held it)."""
        self._lock = threading.Lock()

    def take(self, nbytes):
        """A ``uint8`` buffer of at least ``nbytes`` bytes, reused or new.

        Parameters
        ----------
        nbytes : int

        Returns
        -------
        numpy.ndarray
            1-D, ``uint8``; its contents are undefined.
        """
        if nbytes < self.min_bytes:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            buffers = self._buffers
            best = -1
            for k in range(len(buffers)):
                size = buffers[k].nbytes
                if (
                    nbytes <= size
                    and nbytes >= REUSE_MIN_FRACTION * size
                    and (best < 0 or size < buffers[best].nbytes)
                    and _references(buffers, k) == _IDLE
                ):
                    best = k
            if best >= 0:
                buffer = buffers.pop(best)
                buffers.append(buffer)
                return buffer
            self._trim(self.max_bytes - nbytes, self.max_buffers - 1)
            buffer = np.empty(nbytes, np.uint8)
            if self._bytes + nbytes <= self.max_bytes and len(buffers) < self.max_buffers:
                buffers.append(buffer)
                self._bytes += nbytes
            return buffer

    def idle(self):
        """Bytes of the buffers that nothing but the pool refers to."""
        with self._lock:
            return sum(
                self._buffers[k].nbytes
                for k in range(len(self._buffers))
                if _references(self._buffers, k) == _IDLE
            )

    def release(self):
        """Drop every idle buffer (the memory goes back to the C library)."""
        with self._lock:
            self._trim(0, 0)

    def held(self):
        """Bytes of the buffers the pool holds, in use or idle."""
        return self._bytes

    def _trim(self, keep_bytes, keep_buffers):
        """Drop idle buffers, least recently taken first, until the pool holds at most
        ``keep_bytes`` bytes in at most ``keep_buffers`` buffers, or none is idle (the lock
        is held)."""
        buffers = self._buffers
        dropped = set()
        for k in range(len(buffers)):
            if self._bytes <= keep_bytes and len(buffers) - len(dropped) <= keep_buffers:
                break
            if _references(buffers, k) == _IDLE:
                self._bytes -= buffers[k].nbytes
                dropped.add(k)
        if dropped:
            buffers[:] = [b for k, b in enumerate(buffers) if k not in dropped]


#: The CPU backend's pool (``pool.max_bytes = 0`` keeps none).
pool = BufferPool(POOL_BYTES, POOL_MIN_BYTES)
os.register_at_fork(after_in_child=pool.new_lock)
