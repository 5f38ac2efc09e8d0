"""The CPU backend: ``@njit`` kernels for one layer and one direction.

Each kernel runs its whole time loop in compiled code, with the GIL released. Only the
recurrent product ``W_hh h_{t-1}`` (and ``W_hr r_t`` with projection) and the gate math run
per step; the input term of all steps, the input gradient and the weight gradients are
big GEMMs before or after the loop. The gate math is :mod:`numlstm.gates`, shared with the
CUDA kernels.

The buffers (the ring of states, the tape) are laid out by :mod:`numlstm.backends._layout`,
as on every backend.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from llvmlite import ir as llvm_ir
from numba import get_num_threads, njit, prange, set_num_threads, threading_layer, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..equations import implements
from ..gates import (
    cell_backward,
    cell_backward_ltm_stm,
    cell_backward_peephole,
    cell_forward_ltm_stm,
    cell_forward_peephole,
    cell_update,
    sigmoid,
    tanh,
    use_gate_backward_ltm_stm,
    use_gate_ltm_stm,
)
from . import _buffers, _layout
from ._packed import (
    aligned_empty,
    empty_packed,
    pack,
    packed_matmul,
    packed_shape,
    panel_width,
    transpose,
    wide_vectors,
)

name = "cpu"

#: The array namespace the shared orchestration uses on this backend.
xp = np

_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: dict = {}


@contextmanager
def single_threaded_blas():
    """Run the body with the BLAS that Numba's ``np.dot`` calls limited to one thread.

    The kernels split their work over Numba's threads themselves; a multithreaded BLAS
    called from each of them oversubscribes the cores (measured: up to 100x slower per
    GEMM on a busy machine). The previous thread counts come back when the last
    concurrent caller leaves.
    """
    global _blas_users
    with _blas_lock:
        if _blas_users == 0:
            for library in _blas_libraries():
                _blas_saved[library] = library.get_num_threads()
                library.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for library, threads in _blas_saved.items():
                    library.set_num_threads(threads)
                _blas_saved.clear()


def _start_numba_threads():
    """Start Numba's thread pool with OpenMP's workers spinning only briefly when idle.

    GNU OpenMP's default is to spin for a long time after each parallel region. With
    another OpenMP pool in the process (torch has its own), the spinning workers of each
    pool took the cores from the other: measured 100x slower for both. Workers that
    sleep at once (``OMP_WAIT_POLICY=PASSIVE``) cost a wake-up per parallel region,
    measured 100 us, which doubled the time of small calls. A short spin
    (``GOMP_SPINCOUNT``) keeps the workers awake between the regions of one call and
    asleep between calls. The settings are read once, when the pool starts, so the
    environment is restored right after; settings the user made are kept. The pool starts
    here in either case, so that :func:`run_directions` can ask which threading layer runs.
    """
    from numba.np.ufunc.parallel import _launch_threads

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        _launch_threads()
        return
    os.environ["GOMP_SPINCOUNT"] = str(GOMP_SPINCOUNT)
    try:
        _launch_threads()
    finally:
        del os.environ["GOMP_SPINCOUNT"]


#: Iterations Numba's OpenMP workers spin before they sleep (libgomp's default: 300,000).
GOMP_SPINCOUNT = 20_000


_start_numba_threads()


def run_directions(jobs, batch, loop_flops, weight_bytes):
    """Run the two directions of a layer (entry point shared by every backend).

    ``jobs`` are functions of no arguments, one per direction, independent of each other;
    the results come back in their order. When the batch leaves Numba's threads idle in
    the time loops (fewer sequences than threads, as with one sequence on two threads),
    each time loop has enough work (:data:`CONCURRENT_DIRECTIONS_MIN_FLOPS`) and ``W_hh``
    fits one core's cache (under :data:`UNIT_SPLIT_MIN_BYTES`), the two directions run at
    once, each on its own half of the threads, the second in a worker thread (the kernels
    release the GIL). Otherwise, or where Numba's threading layer cannot run parallel
    regions from two threads at once (``workqueue``), they run one after the other, each
    on all threads: larger weights are shared by hidden units between the threads at
    every step, so that each core keeps its share in cache (float32 (T, B, I, H) =
    (100, 1, 256, 512), 4 MB: 7.4 ms in turn, 11.5 ms at once).

    Parameters
    ----------
    jobs : list of callable
        One per direction.
    batch : int
        ``B``.
    loop_flops : int
        FLOPs of one direction's recurrent products, ``2 T B 4H P``.
    weight_bytes : int
        Bytes of one direction's ``W_hh``.

    Returns
    -------
    list
        What each job returned.
    """
    if (
        len(jobs) != 2
        or loop_flops < CONCURRENT_DIRECTIONS_MIN_FLOPS
        or weight_bytes >= UNIT_SPLIT_MIN_BYTES
    ):
        return [job() for job in jobs]
    threads = get_num_threads()
    if batch >= threads or threading_layer() not in CONCURRENT_LAYERS:
        return [job() for job in jobs]
    share = threads // 2
    second = _direction_worker().submit(_with_threads, jobs[1], threads - share)
    try:
        first = _with_threads(jobs[0], share)
    finally:
        wait([second])  # before an error in the first job leaves, too
    return [first, second.result()]


#: The directions run at once only where each time loop's products take at least this many
#: FLOPs: handing a direction to the worker thread, and the two threads taking turns with
#: the GIL between kernels, cost about 130 us. Measured float32 bidirectional inference with
#: one sequence on 2 threads, at once over one after the other, separate processes,
#: (T, B, I, H), FLOPs: (50, 1, 32, 64), 1.6 M: 1.75; (300, 1, 32, 64), 9.8 M: 1.00;
#: (200, 1, 64, 128), 26 M: 0.82; (100, 1, 96, 192), 29 M: 0.70; (1000, 1, 32, 64), 33 M:
#: 0.70; (100, 1, 128, 256), 52 M: 0.74 (against by units, :data:`UNIT_SPLIT_FEW_ROWS`).
CONCURRENT_DIRECTIONS_MIN_FLOPS = 1 << 24
#: Numba threading layers that run parallel regions started from several threads at once.
CONCURRENT_LAYERS = ("omp", "tbb")

_worker_lock = threading.Lock()
_worker = None
_worker_pid = None


def _direction_worker():
    """The thread that runs a second direction (one per process: a forked child, which
    does not inherit the parent's threads, starts its own)."""
    global _worker, _worker_pid
    with _worker_lock:
        if _worker is None or _worker_pid != os.getpid():
            _worker = ThreadPoolExecutor(1, thread_name_prefix="numlstm-direction")
            _worker_pid = os.getpid()
        return _worker


def _with_threads(job, threads):
    """``job()`` with Numba's thread count set to ``threads`` in the calling thread."""
    saved = get_num_threads()
    set_num_threads(threads)
    try:
        return job()
    finally:
        set_num_threads(saved)


class _ThreadsKept:
    """Puts the calling thread's Numba thread count back if a time-loop kernel raises: the
    kernels set their regions' own (:func:`_limit_threads`) and restore it on return."""

    __slots__ = ("threads",)

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None:
            set_num_threads(self.threads)
        return False


@functools.cache
def _blas_libraries():
    """threadpoolctl's controllers of the BLAS libraries loaded (Numba's is SciPy's)."""
    import scipy.linalg.cython_blas  # noqa: F401  (load it before the controller looks)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


#: The array namespace of the CPU's buffers (:func:`._layout.allocate`): every array starts
#: on a cache line, where NumPy starts a large one 16 bytes past a page. Each 64-byte load
#: of a row then touches one line instead of two, and the threads' blocks of sequences
#: share no line when a row fills whole lines. Float32, (T, B, I, H) = (200, 16, 32, 64),
#: inference on 2 threads: 987 -> 797 us; on 1 thread with B = 8: 777 -> 679 us.
ALIGNED = SimpleNamespace(empty=aligned_empty)

#: The buffers of the calls (their tapes, work arrays and outputs), handed out again once
#: no array refers to them, so that a training loop does not take fresh pages at every
#: step (:mod:`._buffers`): it keeps those of ``buffer_pool.min_bytes`` (128 KB) and more,
#: up to ``buffer_pool.max_bytes`` (256 MiB) in use or idle; ``buffer_pool.max_bytes = 0``
#: keeps none.
buffer_pool = _buffers.pool


def release_memory():
    """Give back the memory of the buffers that no array uses any more.

    The CPU backend keeps the buffers of its calls for the next ones
    (:data:`buffer_pool`); this drops the idle ones, for a process that has finished
    training and wants the memory back. Nothing else changes: the next calls allocate
    anew.
    """
    buffer_pool.release()


#: The forward time loop multiplies ``[x_t, h_{t-1}]`` by the stacked ``[W_ih^T; W_hh^T]``
#: at each step, instead of a projection pass over all steps before it, while the stacked
#: weights take at most this many bytes (and every thread has sequences of its own: with
#: fewer sequences than threads, the pass is what keeps every thread busy). Each step's
#: gate rows then never leave the cache, and the pass's short products and its parallel
#: region are gone. Model forward in inference, time stacked over time with the pass, both
#: in one process, interleaved, (T, B, I, H), stacked bytes: float32 (50, 16, 32, 64), 96 KB:
#: 0.94; (100, 32, 64, 128), 384 KB: 0.975; (100, 64, 128, 128), 512 KB: 0.97;
#: (100, 32, 128, 256), 1.5 MB: 0.99; (100, 64, 256, 256), 2 MB: 1.07; (100, 8, 256, 256),
#: 2 MB: 1.40. float64 (50, 16, 32, 64): 0.97; (100, 32, 64, 128): 0.96; (100, 64, 128,
#: 128), 1 MB: 0.96. Training changes by 0-1 %.
STACKED_WEIGHTS_MAX_BYTES = 1 << 20

#: Steps per input-projection GEMM in inference, where nothing is saved: bounds the memory
#: of the gate buffer by ``INFERENCE_CHUNK * B * 4H`` whatever the sequence length.
INFERENCE_CHUNK = 64
#: ... and by this many bytes, with fewer steps per chunk for large batches and layers.
#: glibc maps an allocation above 32 MB afresh at every call, and this machine then pays
#: a page fault per 4 KB page touched: float64 (T, B, I, H) = (100, 64, 256, 256), whose 64
#: steps of gates take 32 MB, ran its inference in 93 ms a call instead of 47-50.
INFERENCE_GATE_BYTES = 1 << 23
#: Steps of gates kept in inference on the stacked path, which has no projection pass to
#: fill them ahead. One step's rows then stay in the L1 cache, where ``C`` steps had each
#: step's product write new ones: float32 (T, B, I, H) = (50, 16, 32, 64) inference
#: 4.5-6 % faster, (100, 32, 64, 128) 2-4 % (in-process A/B, both orders).
INFERENCE_STACKED_CHUNK = 1


@njit(cache=True, nogil=True, inline="always")
def _split_gates(stacked, hidden):
    """The four gate blocks (i, f, g, o) of a stacked ``(4H,)`` row, as separate views."""
    return _gate_blocks(stacked, hidden, 0, hidden)


@njit(cache=True, nogil=True, inline="always")
def _gate_blocks(stacked, stride, lo, n):
    """Units ``lo:lo + n`` of the four gate blocks (i, f, g, o) of a row stacked as four
    blocks of ``stride`` units, as separate views."""
    return (
        stacked[lo : lo + n],
        stacked[stride + lo : stride + lo + n],
        stacked[2 * stride + lo : 2 * stride + lo + n],
        stacked[3 * stride + lo : 3 * stride + lo + n],
    )


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_forward_row(a, c_prev, c, r, lo):
    """:func:`~numlstm.gates.cell_forward` over the hidden units ``lo:lo + n`` of one
    sequence (all ``H`` of them, or one thread's share).

    ``a`` is the sequence's stacked ``(4H,)`` gate row: it enters holding the whole
    pre-activation ``a_t`` (the input projection, which adds the bias, and the recurrent
    product, accumulated into it) and leaves holding the activations of these units.
    ``c_prev``, ``c`` and ``r`` are the ``(n,)`` slices of ``c_{t-1}``, ``c_t`` and
    ``o_t * tanh(c_t)``.

    The same equations as :func:`~numlstm.gates.cell_forward`, in five loops: one per gate
    activation, in place, then :func:`~numlstm.gates.cell_update`. Each loop has few
    arrays, so LLVM vectorises it with few overlap checks at run time and without running
    out of vector registers: measured 3.0 -> 2.5 ns per unit at H = 64 and 2.3 -> 2.0 at
    H = 256 in float32, 6.2 -> 4.9 at H = 256 in float64, with bit-identical results.
    (Reading one gate row instead of three, the input term, the recurrent term and the
    bias, had brought 4.7 -> 3.4 ns at H = 64.)
    """
    wide_vectors()
    hidden = a.shape[0] // 4
    n = c_prev.shape[0]
    a_i, a_f, a_g, a_o = _gate_blocks(a, hidden, lo, n)
    for j in range(n):
        a_i[j] = sigmoid(a_i[j])
    for j in range(n):
        a_f[j] = sigmoid(a_f[j])
    for j in range(n):
        a_g[j] = tanh(a_g[j])
    for j in range(n):
        a_o[j] = sigmoid(a_o[j])
    for j in range(n):
        c[j], r[j] = cell_update(a_i[j], a_f[j], a_g[j], a_o[j], c_prev[j])


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_backward_row(gates, c_prev, c, d_r, d_c, d_a, lo):
    """:func:`~numlstm.gates.cell_backward` over the hidden units ``lo:lo + n`` of one
    sequence.

    ``gates`` and ``d_a`` are the sequence's stacked ``(4H,)`` rows of activations and of
    ``δa_t``, which receives these units' gradients. ``c_prev``, ``c``, ``d_r`` and ``d_c``
    are ``(n,)`` slices; ``d_c`` enters holding ``δc`` carried from step ``t + 1`` and
    leaves holding the one carried to ``t - 1``.
    """
    wide_vectors()
    hidden = gates.shape[0] // 4
    n = c_prev.shape[0]
    i, f, g, o = _gate_blocks(gates, hidden, lo, n)
    d_a_i, d_a_f, d_a_g, d_a_o = _gate_blocks(d_a, hidden, lo, n)
    for j in range(n):
        d_a_i[j], d_a_f[j], d_a_g[j], d_a_o[j], d_c[j] = cell_backward(
            i[j], f[j], g[j], o[j], c_prev[j], c[j], d_r[j], d_c[j]
        )


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_forward_row_peephole(a, peephole, c_prev, c, r):
    """:func:`~numlstm.gates.cell_forward_peephole` over the ``H`` units of one sequence.

    As :func:`cell_forward_row`; ``peephole`` is ``(3, H)``, rows i, f, o.
    """
    wide_vectors()
    hidden = c_prev.shape[0]
    a_i, a_f, a_g, a_o = _split_gates(a, hidden)
    p_i, p_f, p_o = peephole[0], peephole[1], peephole[2]
    for j in range(hidden):
        a_i[j], a_f[j], a_g[j], a_o[j], c[j], r[j] = cell_forward_peephole(
            a_i[j], a_f[j], a_g[j], a_o[j], c_prev[j], p_i[j], p_f[j], p_o[j]
        )


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_forward_row_ltm_stm(a, c_prev, c, m):
    """:func:`~numlstm.gates.cell_forward_ltm_stm` over the ``H`` units of one sequence.

    As :func:`cell_forward_row`, but ``m`` receives the kept memory ``f_t ⊙ c_{t-1}``, the
    use layer's input; :func:`use_gate_row_ltm_stm` computes ``h_t`` after the product.
    """
    wide_vectors()
    hidden = c_prev.shape[0]
    a_i, a_f, a_g, a_v = _split_gates(a, hidden)
    for j in range(hidden):
        a_i[j], a_f[j], a_g[j], a_v[j], c[j], m[j] = cell_forward_ltm_stm(
            a_i[j], a_f[j], a_g[j], a_v[j], c_prev[j]
        )


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def use_gate_row_ltm_stm(u, b_u, v, h):
    """:func:`~numlstm.gates.use_gate_ltm_stm` over the ``H`` units of one sequence.

    ``u`` enters holding ``W_u m_t`` and leaves holding ``U_t``; ``v`` is the V gate's
    activation and ``h`` receives ``h_t``.
    """
    wide_vectors()
    for j in range(u.shape[0]):
        u[j], h[j] = use_gate_ltm_stm(u[j] + b_u[j], v[j])


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_backward_row_peephole(gates, c_prev, c, peephole, d_r, d_c, d_a):
    """:func:`~numlstm.gates.cell_backward_peephole` over the ``H`` units of one sequence.

    As :func:`cell_backward_row`; ``peephole`` is ``(3, H)``, rows i, f, o.
    """
    wide_vectors()
    hidden = c_prev.shape[0]
    i, f, g, o = _split_gates(gates, hidden)
    d_a_i, d_a_f, d_a_g, d_a_o = _split_gates(d_a, hidden)
    p_i, p_f, p_o = peephole[0], peephole[1], peephole[2]
    for j in range(hidden):
        d_a_i[j], d_a_f[j], d_a_g[j], d_a_o[j], d_c[j] = cell_backward_peephole(
            i[j], f[j], g[j], o[j], c_prev[j], c[j], p_i[j], p_f[j], p_o[j], d_r[j], d_c[j]
        )


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def use_gate_backward_row_ltm_stm(u, v, d_h, d_u, d_a_v):
    """:func:`~numlstm.gates.use_gate_backward_ltm_stm` over the ``H`` units of one sequence.

    ``d_u`` receives ``δa^u_t`` and ``d_a_v`` the V gate's ``δa^o_t``.
    """
    wide_vectors()
    for j in range(u.shape[0]):
        d_u[j], d_a_v[j] = use_gate_backward_ltm_stm(u[j], v[j], d_h[j])


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def cell_backward_row_ltm_stm(gates, c_prev, d_m, d_c, d_a):
    """:func:`~numlstm.gates.cell_backward_ltm_stm` over the ``H`` units of one sequence.

    ``d_m`` is ``W_u^T δa^u_t``; ``d_c`` is carried as in :func:`cell_backward_row`;
    ``d_a`` receives the i, f and g blocks of ``δa_t`` (the o block is the use gate's).
    """
    wide_vectors()
    hidden = c_prev.shape[0]
    i, f, g, _ = _split_gates(gates, hidden)
    d_a_i, d_a_f, d_a_g, _ = _split_gates(d_a, hidden)
    for j in range(hidden):
        d_a_i[j], d_a_f[j], d_a_g[j], d_c[j] = cell_backward_ltm_stm(
            i[j], f[j], g[j], c_prev[j], d_m[j], d_c[j]
        )


@njit(cache=True, nogil=True, inline="always")
def _step_states(h_seq, y, h_in_y, t, prev, cur, reverse):
    """``h_{t-1}`` to read and where ``h_t`` goes, at step ``t`` of a time loop: the slots
    ``prev`` and ``cur`` of the ring ``h_seq``, or, with ``h_in_y``, the output itself
    (``y`` of the step before, ``h_seq``'s slot ``prev`` holding ``h_0`` at the first)."""
    if not h_in_y:
        return h_seq[prev], h_seq[cur]
    first = t == y.shape[0] - 1 if reverse else t == 0
    if first:
        return h_seq[prev], y[t]
    return y[t + 1 if reverse else t - 1], y[t]


@njit(cache=True, nogil=True)
def _blocks(size, threads):
    """How many parts to split ``size`` rows into: one per thread, at most ``size``."""
    return max(1, min(threads, size))


#: A parallel region whose work is below this many FLOPs a thread runs on fewer threads.
PARALLEL_MIN_FLOPS = 1 << 21


@intrinsic
def _thread_count(typingctx):
    """Numba's thread count in the calling thread, as ``numba.get_num_threads``.

    Numba's own ``get_num_threads`` and ``set_num_threads`` reach its threading layer
    through ctypes pointers when compiled, which keeps a function that calls them out of
    the cache; these call the layer's functions by the names Numba registers with LLVM
    when it starts its threads (which :func:`_start_numba_threads` does at import), as
    compiled parallel regions do.
    """

    def codegen(context, builder, signature, args):
        intp = context.get_value_type(types.intp)
        function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(intp, []), "get_num_threads"
        )
        return builder.call(function, [])

    return types.intp(), codegen


@intrinsic
def _set_thread_count(typingctx, threads):
    """``numba.set_num_threads(threads)`` for the calling thread (see :func:`_thread_count`);
    ``threads`` must lie between 1 and ``NUMBA_NUM_THREADS``."""

    def codegen(context, builder, signature, args):
        count = llvm_ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [count]), "set_num_threads"
        )
        builder.call(function, [builder.trunc(args[0], count)])
        return context.get_dummy_value()

    return types.none(types.intp), codegen


@njit(cache=True, nogil=True)
def _limit_threads(threads):
    """Run the next parallel regions of the calling thread on at most ``threads`` of Numba's
    threads (at least one); return the count to restore with :func:`_set_thread_count`.

    A region wakes every thread, even those its iterations leave without work, and waits
    for them at its end: after some idle time, a thread asleep on a virtual machine's idle
    CPU took about 0.4 ms to wake (float32 (T, B, I, H) = (1000, 1, 32, 64) inference, two
    regions per chunk of 64 steps: 0.79 ms back to back, 12.8-15.3 ms 20 ms after the last
    call).
    """
    saved = _thread_count()
    _set_thread_count(max(1, min(threads, saved)))
    return saved


@njit(cache=True, nogil=True)
def _block(k, blocks, size):
    """Bounds ``[lo, hi)`` of the ``k``-th of ``blocks`` near-equal parts of ``range(size)``."""
    return k * size // blocks, (k + 1) * size // blocks


# Row operations of the kernels' loops, written as loops. In a ``parallel=True`` function an
# array statement on a row (a copy, a sum, a fill with zeros) becomes a parallel loop of its
# own, serialised inside the thread's loop at a cost per row: the backward time loop at
# (T, B, I, H) = (50, 16, 32, 64), float32, went 155 -> 137-143 us with these calls. And
# ``np.zeros`` for the threads' partial sums was a fork and join of the threads of its own.


@njit(cache=True, nogil=True)
def _copy(source, target):
    """``target[:] = source`` (1-D)."""
    for j in range(target.shape[0]):
        target[j] = source[j]


@njit(cache=True, nogil=True)
def _add(source, target):
    """``target[:] += source`` (1-D)."""
    for j in range(target.shape[0]):
        target[j] += source[j]


@njit(cache=True, nogil=True)
def _zero(array):
    """``array[...] = 0``."""
    array.fill(0)


#: A time loop's recurrent weights above this size (packed) are swept in groups of panels
#: whose order reverses every other step: a sweep over more than the cache in the same order
#: finds each group evicted by the others, one in reverse order starts with the most
#: recently read. Measured where a thread reads 2-4 MB per step (its L2: 2 MB), in-process
#: A/B: by units (200, 8, 128, 512) forward 2.5-5.6 % faster; by sequences
#: (100, 32, 128, 512) forward 7-8 %, training 5 % (its backward alone 2.7-3.7 %). Below
#: it the weights stay in L2 either way, and (100, 64, 256, 256) did not change.
REVERSED_SWEEP_MIN_BYTES = 1 << 20


@njit(cache=True, nogil=True)
def _recurrent_product(rows, packed, out, n, accumulate, t):
    """:func:`._packed.packed_matmul` for step ``t`` of a time loop, in groups of four
    panels in reverse order at odd steps where ``packed`` is larger than
    :data:`REVERSED_SWEEP_MIN_BYTES`."""
    if packed.size * packed.itemsize <= REVERSED_SWEEP_MIN_BYTES:
        packed_matmul(rows, packed, out, n, accumulate)
        return
    nr = packed.shape[2]
    groups = -(-packed.shape[0] // 4)
    for q in range(groups):
        p0 = 4 * (groups - 1 - q if t % 2 else q)
        c0 = p0 * nr
        c1 = min(n, c0 + 4 * nr)
        packed_matmul(rows, packed[p0 : p0 + 4], out[:, c0:c1], c1 - c0, accumulate)


@njit(cache=True, nogil=True, parallel=True)
def _input_projection(x, w_ih_packed, bias, gates, t_lo, t_hi, threads):
    """``gates[: t_hi - t_lo] = x[t_lo:t_hi] W_ih^T + bias``, split over threads by blocks of
    steps."""
    steps, n_inputs, n_gates = t_hi - t_lo, x.shape[2], gates.shape[2]
    blocks = _blocks(steps, threads)
    for k in prange(blocks):
        s_lo, s_hi = _block(k, blocks, steps)
        packed_matmul(
            x[t_lo + s_lo : t_lo + s_hi].reshape(-1, n_inputs),
            w_ih_packed,
            gates[s_lo:s_hi].reshape(-1, n_gates),
            n_gates,
            False,
            bias,
        )


@implements(
    "input-projection",
    "recurrent-projection",
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    "projection",
    "padding",
    "peephole-input-gate",
    "peephole-forget-gate",
    "peephole-output-gate",
    "kept-memory",
    "use-layer",
    "use-gate-output",
    backend="cpu",
)
@njit(cache=True, nogil=True, parallel=True)
def forward_kernel(
    x,
    w_ih_packed,
    w_hh_packed,
    bias,
    w_hr_t,
    peephole,
    w_u_t,
    b_u,
    lengths,
    reverse,
    gates,
    c_seq,
    h_seq,
    r_seq,
    m_seq,
    u_seq,
    y,
    h_in_y,
    threads,
):
    """Forward time loop of one layer and one direction, over a padded batch.

    Shapes: ``T`` steps, ``B`` batch, ``I`` inputs, ``H`` hidden units, ``P`` outputs per
    step (``proj_size`` or ``H``). Every array is C-contiguous; none may alias another.

    The work is split over Numba's threads twice per chunk of steps: the input projection
    by blocks of steps, then the recurrence by blocks of sequences, which are independent
    for the whole time loop, so the threads never wait for each other inside it. With
    stacked weights (``w_ih_packed`` None) there is no projection pass: each step
    multiplies ``[x_t, h_{t-1}]`` by ``[W_ih^T; W_hh^T]``, the input term included.

    Parameters
    ----------
    x : (T, B, I) array
        The layer's input.
    w_ih_packed, w_hh_packed : arrays
        The input and recurrent weights (gates stacked i, f, g, o), transposed (``I x 4H``
        and ``P x 4H``) and packed by :func:`._packed.pack` for the products of
        :func:`._packed.packed_matmul`: ``W_hh`` is packed once for the whole time loop.
        Or ``w_ih_packed`` None and ``w_hh_packed`` both stacked, ``(I + P) x 4H``
        (:data:`STACKED_WEIGHTS_MAX_BYTES` says when).
    bias : (4H,) array
        ``b_ih + b_hh`` (zeros without bias), added by the input projection; the recurrent
        product then accumulates into the same gate rows, so that the gate loop reads one
        row per sequence. With stacked weights, each step's product adds it.
    w_hr_t : (H, P) array or None
        Projection weights, transposed; None without projection.
    peephole : (3, H) array or None
        The peephole cell's weights (rows i, f, o); None for another cell.
    w_u_t, b_u : (H, H), (H,) arrays or None
        The LTM/STM cell's use layer, ``W_u`` transposed and ``b_u`` (zeros without
        bias); None for another cell.

    Each of these is None or an array at compile time: Numba prunes the branches that
    test it, so every cell compiles only its own code (the standard cell's first forward
    compiled in 9.3 s instead of 11.5).
    lengths : (B,) int64 array
        Real steps of each sequence, ``1 <= lengths[b] <= T``.
    reverse : bool
        Run from step ``T - 1`` down to 0 (from each sequence's last real step).
    gates : (C, B, 4H) array, out
        Work buffer for ``C`` steps of gate pre-activations; it receives the activations
        i, f, g, o. With ``C == T`` it is the tape the backward pass reads. With stacked
        weights, any ``C`` from 1 (inference needs no more).
    c_seq : (S, B, H) array, in/out
        Ring of long-term memories; the initial state must be in slot ``T % S`` (reverse)
        or 0 (forward).
    h_seq : (S, B, P) array, in/out
        Ring of short-term memories, the same way.
    r_seq : (R, B, H) array, out
        ``o_t * tanh(c_t)`` before projection: ``R == T`` to keep every step for the
        backward pass, ``R == 1`` for inference; unused (``R == 0``) without projection.
    m_seq, u_seq : (R, B, H) arrays, out
        The LTM/STM cell's kept memory ``m_t`` and use layer ``U_t``, kept as ``r_seq``;
        ``(0, B, H)`` for another cell.
    y : (T, B, P) array, out
        The output: ``h_t`` at real steps, zeros at padded ones.
    h_in_y : bool
        Every sequence has all ``T`` steps and nothing else needs the ring of ``h``
        (inference): each ``h_t`` is written straight into ``y[t]`` and the next step reads
        it there, and ``h_seq`` only holds ``h_0``. That saves copying each step's output,
        measured 2-4 % of a float32 forward.
    threads : int
        Numba threads to split the work over.
    """
    steps_total, batch, n_inputs = x.shape
    chunk = gates.shape[0]
    slots = c_seq.shape[0]
    hidden = c_seq.shape[2]
    stacked = w_ih_packed is None  # w_hh_packed holds [W_ih^T; W_hh^T]
    # Without a projection pass to fill the gate buffer ahead, the steps need not go by
    # chunks: one pass over them all, step t in the buffer's row (t - t_lo) % C.
    span = steps_total if stacked else chunk
    for n in range((steps_total + span - 1) // span):
        t_lo, t_hi = _layout.chunk_bounds(n, span, steps_total, reverse)
        if not stacked:
            flops = 2 * (t_hi - t_lo) * batch * n_inputs * gates.shape[2]
            saved = _limit_threads(flops // PARALLEL_MIN_FLOPS)
            _input_projection(x, w_ih_packed, bias, gates, t_lo, t_hi, _thread_count())
            _set_thread_count(saved)
        blocks = _blocks(batch, threads)
        saved = _limit_threads(blocks)
        for k in prange(blocks):
            lo, hi = _block(k, blocks, batch)
            # [x_t, h_{t-1}] for each of the block's sequences, with stacked weights.
            x_h = np.empty((hi - lo if stacked else 0, n_inputs + h_seq.shape[2]), x.dtype)
            times = range(t_hi - 1, t_lo - 1, -1) if reverse else range(t_lo, t_hi)
            for t in times:
                prev = (t + 1) % slots if reverse else t % slots
                cur = t % slots if reverse else (t + 1) % slots
                a = gates[(t - t_lo) % chunk]
                h_prev, h = _step_states(h_seq, y, h_in_y, t, prev, cur, reverse)
                r = h if w_hr_t is None else r_seq[t % r_seq.shape[0]]
                m = r if w_u_t is None else m_seq[t % m_seq.shape[0]]
                if stacked:
                    for b in range(lo, hi):
                        _copy(x[t, b], x_h[b - lo, :n_inputs])
                        _copy(h_prev[b], x_h[b - lo, n_inputs:])
                    packed_matmul(x_h, w_hh_packed, a[lo:hi], 4 * hidden, False, bias)
                else:
                    _recurrent_product(h_prev[lo:hi], w_hh_packed, a[lo:hi], 4 * hidden, True, t)
                for b in range(lo, hi):
                    if t >= lengths[b]:
                        _copy(c_seq[prev, b], c_seq[cur, b])
                        if w_hr_t is not None:
                            _zero(r[b])  # read by the projection's weight gradient
                        if w_u_t is not None:
                            _zero(m[b])  # read by the use layer's product and its gradient
                        continue
                    if peephole is not None:
                        cell_forward_row_peephole(
                            a[b], peephole, c_seq[prev, b], c_seq[cur, b], r[b]
                        )
                    elif w_u_t is not None:
                        cell_forward_row_ltm_stm(a[b], c_seq[prev, b], c_seq[cur, b], m[b])
                    else:
                        cell_forward_row(a[b], c_seq[prev, b], c_seq[cur, b], r[b], 0)
                if w_u_t is not None:
                    u = u_seq[t % u_seq.shape[0]]
                    np.dot(m[lo:hi], w_u_t, u[lo:hi])
                    for b in range(lo, hi):
                        if t < lengths[b]:
                            use_gate_row_ltm_stm(u[b], b_u, a[b, 3 * hidden :], r[b])
                if w_hr_t is not None:
                    np.dot(r[lo:hi], w_hr_t, h[lo:hi])
                if not h_in_y:
                    for b in range(lo, hi):
                        if t < lengths[b]:
                            _copy(h[b], y[t, b])
                        else:
                            _copy(h_prev[b], h[b])
                            _zero(y[t, b])
        _set_thread_count(saved)


@implements(
    "recurrent-projection",
    "input-gate",
    "forget-gate",
    "cell-candidate",
    "output-gate",
    "cell-update",
    "hidden-update",
    "padding",
    backend="cpu",
)
@njit(cache=True, nogil=True, parallel=True)
def forward_steps_by_units(
    t_lo, t_hi, reverse, gates, w_hh_units, lengths, c_seq, h_seq, y, h_in_y
):
    """Steps ``t_lo:t_hi`` of :func:`forward_kernel`, each split over threads by hidden units.

    For a few sequences against large weights: each thread multiplies every sequence by
    its block of ``W_hh`` (only that block stays in its cache) and updates its units; the
    threads meet at the end of every step, since the next step needs all of ``h_t``.
    Standard cell without projection; :func:`layer_forward` calls it in place of
    :func:`forward_kernel`'s time loop (so that it compiles only when used), with
    ``gates`` holding the input term of steps ``t_lo:t_hi``.

    Parameters
    ----------
    w_hh_units : (U, 4, panels, P, NR) array
        ``W_hh^T`` packed by blocks of units: ``[k, g]`` holds the columns of gate ``g``
        for the units ``_block(k, U, H)`` (:func:`_unit_blocks_forward`).
    t_lo, t_hi, reverse, gates, lengths, c_seq, h_seq, y, h_in_y
        As :func:`forward_kernel`'s.
    """
    slots = c_seq.shape[0]
    hidden = c_seq.shape[2]
    blocks = w_hh_units.shape[0]
    times = range(t_hi - 1, t_lo - 1, -1) if reverse else range(t_lo, t_hi)
    for t in times:
        prev = (t + 1) % slots if reverse else t % slots
        cur = t % slots if reverse else (t + 1) % slots
        a = gates[t - t_lo]
        h_prev, h = _step_states(h_seq, y, h_in_y, t, prev, cur, reverse)
        for k in prange(blocks):
            lo, hi = _block(k, blocks, hidden)
            for q in range(4):
                # The four gates' blocks, in reverse order every other step (as
                # _recurrent_product sweeps its panels).
                g = q if t % 2 == 0 else 3 - q
                units = a[:, g * hidden + lo : g * hidden + hi]
                packed_matmul(h_prev, w_hh_units[k, g], units, hi - lo, True)
            for b in range(c_seq.shape[1]):
                if t >= lengths[b]:
                    _copy(c_seq[prev, b, lo:hi], c_seq[cur, b, lo:hi])
                    _copy(h_prev[b, lo:hi], h[b, lo:hi])
                    _zero(y[t, b, lo:hi])
                    continue
                cell_forward_row(a[b], c_seq[prev, b, lo:hi], c_seq[cur, b, lo:hi], h[b, lo:hi], lo)
                if not h_in_y:
                    _copy(h[b, lo:hi], y[t, b, lo:hi])


@implements(
    "d-hidden",
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    "d-initial-state",
    backend="cpu",
)
@njit(cache=True, nogil=True, parallel=True)
def backward_steps_by_units(reverse, gates, c_seq, w_hh_units, lengths, d_y, d_h, d_c, d_gates):
    """The time loop of :func:`backward_kernel`, each step split over threads by units.

    The counterpart of :func:`forward_steps_by_units`: each thread computes ``δa_t`` for
    its units, and then, once every thread has (``δh_{t-1}`` needs all of ``δa_t``), the
    columns of ``δh_{t-1} = δa_t W_hh`` that belong to its units. Standard cell without
    projection; :func:`layer_backward` calls it before :func:`backward_kernel`, which then
    skips its own time loop.

    Parameters
    ----------
    w_hh_units : (U, panels, 4H, NR) array
        ``W_hh`` packed by blocks of units: block ``k`` is ``W_hh[:, lo:hi]`` for the units
        ``_block(k, U, H)`` (:func:`_unit_blocks_backward`).
    reverse, gates, c_seq, lengths, d_y, d_h, d_c, d_gates
        As :func:`backward_kernel`'s.
    """
    steps_total, batch, hidden = d_gates.shape[0], d_c.shape[0], d_c.shape[1]
    blocks = w_hh_units.shape[0]
    d_h_recurrent = np.empty(d_h.shape, d_h.dtype)
    times = range(steps_total) if reverse else range(steps_total - 1, -1, -1)
    for t in times:
        prev = t + 1 if reverse else t
        cur = t if reverse else t + 1
        for k in prange(blocks):
            lo, hi = _block(k, blocks, hidden)
            for b in range(batch):
                if t >= lengths[b]:
                    for g in range(4):
                        _zero(d_gates[t, b, g * hidden + lo : g * hidden + hi])
                    continue
                _add(d_y[t, b, lo:hi], d_h[b, lo:hi])
                cell_backward_row(
                    gates[t, b],
                    c_seq[prev, b, lo:hi],
                    c_seq[cur, b, lo:hi],
                    d_h[b, lo:hi],
                    d_c[b, lo:hi],
                    d_gates[t, b],
                    lo,
                )
        for k in prange(blocks):
            lo, hi = _block(k, blocks, hidden)
            packed_matmul(d_gates[t], w_hh_units[k], d_h_recurrent[:, lo:hi], hi - lo, False)
            for b in range(batch):
                if t < lengths[b]:
                    _copy(d_h_recurrent[b, lo:hi], d_h[b, lo:hi])


@njit(cache=True, nogil=True, error_model="numpy")
def _add_rows(rows, total):
    """``total += rows.sum(axis=0)`` for a block of rows (a slice of columns too), one row at
    a time.

    A plain loop: the array expression ``total += rows[r]`` per row took 6x longer (12.5
    against 2.0 us for 128 rows of 256 float32), a fifth of the time of the gradient GEMMs
    at H = 64.
    """
    for r in range(rows.shape[0]):
        _add(rows[r], total)


@njit(cache=True, nogil=True)
def _sum_parts(parts, total):
    """``total[...] = parts.sum(axis=0)`` for the threads' partial sums, C-contiguous.

    A plain loop: NumPy's reduction over an axis took 1.5 s of the cold compile.
    """
    size = total.size
    flat_parts = parts.reshape(parts.shape[0], size)
    flat_total = total.reshape(size)
    for j in range(size):
        flat_total[j] = flat_parts[0, j]
    for k in range(1, parts.shape[0]):
        for j in range(size):
            flat_total[j] += flat_parts[k, j]


#: The gradient GEMMs transpose each block of ``δa`` before the weight gradients' products
#: read ``δa^T`` where a row of ``δa`` (``4H`` values) takes at least this many bytes. Read
#: in place, ``δa^T`` puts each step of the products' ``k`` on a new cache line, and with
#: rows of 4 KB all those lines fall in one set of the L1 cache. The gradient GEMMs of one
#: thread's half of the rows (``δx``, ``δW_ih``, ``δW_hh`` by blocks of 128 rows), float32,
#: (T, B, I, H) = (100, 64, 256, 256): 32.3 -> 30.2 ms; (200, 8, 128, 512): 17.7 -> 15.8
#: ms; at H = 128, rows of 2 KB, (100, 32, 64, 128): 2.67 -> 2.70, no gain for the copy.
TRANSPOSE_MIN_ROW_BYTES = 4096


@njit(cache=True, nogil=True)
def _d_a_transposed(d_a_block, d_a_t):
    """``δa^T`` of a block of ``δa`` as the products read it: copied into ``d_a_t`` by
    :func:`._packed.transpose`, or in place where ``d_a_t`` has no rows (see
    :data:`TRANSPOSE_MIN_ROW_BYTES`)."""
    if d_a_t.shape[0] == 0:
        return d_a_block.T
    d_a_block_t = d_a_t[: d_a_block.shape[1], : d_a_block.shape[0]]
    transpose(d_a_block, d_a_block_t)
    return d_a_block_t


@njit(cache=True, nogil=True)
def _weight_gradients(d_a, m0, m1, inputs, h_prev, d_w_ih, d_w_hh, scratch, d_a_t):
    """``d_w_ih[m0:m1] = d_a[:, m0:m1]^T inputs`` and ``d_w_hh[m0:m1] = d_a[:, m0:m1]^T
    h_{t-1}``: gate rows ``m0:m1`` of the weight gradients, summed over all rows of ``d_a``
    (steps and sequences) in blocks of ``scratch.shape[1]`` rows. Each block of ``δa`` is
    transposed into ``d_a_t`` (:func:`_d_a_transposed`), and its rows of ``inputs`` and
    ``h_{t-1}`` packed into ``scratch`` (panels of ``inputs``, then of ``h_{t-1}``)."""
    rows, n_inputs = inputs.shape  # rows >= 1: the checks reject T = 0 and B = 0
    n_out = h_prev.shape[1]
    block_rows = scratch.shape[1]
    input_panels = -(-n_inputs // scratch.shape[2])
    for r0 in range(0, rows, block_rows):
        r1 = min(r0 + block_rows, rows)
        d_a_block_t = _d_a_transposed(d_a[r0:r1, m0:m1], d_a_t)
        x_packed = scratch[:input_panels, : r1 - r0]
        h_packed = scratch[input_panels:, : r1 - r0]
        pack(inputs[r0:r1], x_packed)
        pack(h_prev[r0:r1], h_packed)
        packed_matmul(d_a_block_t, x_packed, d_w_ih[m0:m1], n_inputs, r0 > 0)
        packed_matmul(d_a_block_t, h_packed, d_w_hh[m0:m1], n_out, r0 > 0)


#: :func:`_gradient_gemms` splits the gate rows of the weight gradients over threads in
#: multiples of this many, so that no two threads write to one cache line of ``δb``.
GATE_ROWS_ALIGN = 16


@implements("d-input", "d-weights", backend="cpu")
@njit(cache=True, nogil=True, parallel=True)
def _gradient_gemms(
    d_a, inputs, h_prev, w_ih_packed, d_x, d_w_ih, d_w_hh, d_bias, scratch, d_a_t, threads
):
    """The gradients that are sums over all steps, for layers with large weights.

    ``δx = δa W_ih`` splits over threads by rows (steps and sequences; ``w_ih_packed`` is
    ``W_ih`` packed by :func:`._packed.pack`). The weight and bias gradients split by gate
    rows: each thread computes its rows of ``δW_ih = δa^T x``, ``δW_hh = δa^T h_{t-1}`` and
    ``δb`` over all rows of ``δa``, so that its share of the result stays in its cache and
    no partial sums are added up at the end (each value is summed in the same order
    whatever the number of threads). Each thread packs the blocks of ``x`` and
    ``h_{t-1}`` for itself.

    Parameters
    ----------
    d_a : (N, 4H) array
        ``δa`` of every step and sequence.
    inputs, h_prev : (N, I), (N, P) arrays
        The layer's input and ``h_{t-1}``, row for row with ``d_a``.
    w_ih_packed : array
        ``W_ih`` (``4H x I``) packed.
    d_x : (N, I) array, out
    d_w_ih, d_w_hh, d_bias : (4H, I), (4H, P), (4H,) arrays, out
    scratch : (threads, ceil(I / NR) + ceil(P / NR), GRADIENT_BLOCK_ROWS, NR) array
        Work space for the packed blocks, one per thread (64-byte aligned).
    d_a_t : (threads, 4H or 0, GRADIENT_BLOCK_ROWS) array
        Work space for the transposed blocks of ``δa``, one per thread (see
        :func:`gradient_work`).
    threads : int
        Numba threads to split the work over.
    """
    rows, n_gates = d_a.shape
    n_inputs = inputs.shape[1]
    block_rows = scratch.shape[2]
    blocks = _blocks(rows, threads)
    for k in prange(blocks):
        lo, hi = _block(k, blocks, rows)
        for r0 in range(lo, hi, block_rows):
            r1 = min(r0 + block_rows, hi)
            packed_matmul(d_a[r0:r1], w_ih_packed, d_x[r0:r1], n_inputs, False)
    aligned_rows = -(-n_gates // GATE_ROWS_ALIGN)
    for k in prange(threads):
        m0 = min(n_gates, GATE_ROWS_ALIGN * (aligned_rows * k // threads))
        m1 = min(n_gates, GATE_ROWS_ALIGN * (aligned_rows * (k + 1) // threads))
        if m1 > m0:
            _weight_gradients(d_a, m0, m1, inputs, h_prev, d_w_ih, d_w_hh, scratch[k], d_a_t[k])
            _zero(d_bias[m0:m1])
            _add_rows(d_a[:, m0:m1], d_bias[m0:m1])


#: Rows of ``δa`` per block of :func:`_gradient_gemms_packed`: the block (``128 x 4H``, 512
#: KB at float32 and H = 256) stays in L2 from the product ``δa W_ih`` on to the weight
#: gradients. 128 was best or within 2 % of best from H = 64 to 256 (64 to 512 rows tried).
GRADIENT_BLOCK_ROWS = 128
#: :func:`_gradient_gemms_packed` is used while a thread's partial ``δW_ih`` and ``δW_hh``
#: (``4H x (I + P)``) fit in this many bytes. Beyond, the partials stream through L3 at
#: every block, and :func:`_gradient_gemms`, whose threads each keep their gate rows of
#: the result, wins. ``python bench/gradients.py`` (time by rows over time by gate rows;
#: T, B, I, H; partials), float32: 50, 16, 32, 64, 96 KB: 0.92; 100, 32, 64, 128, 384 KB:
#: 0.84; 100, 32, 128, 256, 1.5 MB: 0.98; 100, 64, 256, 256, 2 MB: 0.97;
#: 100, 32, 128, 512, 5 MB: 1.00; 200, 8, 128, 512, 5 MB: 1.05; 50, 16, 256, 1024,
#: 20 MB: 1.44. float64: 0.83, 0.92, 1.04 (3 MB), 0.99 (4 MB), 1.02, 1.04, 1.36.
PACKED_GRADIENT_MAX_BYTES = 1 << 22


def gradient_work(threads, n_inputs, n_out, hidden, dtype):
    """The work space of :func:`_gradient_gemms` and :func:`_gradient_gemms_packed`.

    Returns
    -------
    scratch : (threads, ceil(I / NR) + ceil(P / NR), GRADIENT_BLOCK_ROWS, NR) array
        Each thread's packed blocks of ``x`` and ``h_{t-1}``.
    d_a_t : (threads, 4H, GRADIENT_BLOCK_ROWS) array
        Each thread's transposed block of ``δa``; ``(threads, 0, GRADIENT_BLOCK_ROWS)``
        where a row of ``δa`` is shorter than :data:`TRANSPOSE_MIN_ROW_BYTES` (the
        products then read ``δa^T`` in place).
    """
    nr = panel_width(dtype)
    panels = -(-n_inputs // nr) + -(-n_out // nr)
    scratch = aligned_empty((threads, panels, GRADIENT_BLOCK_ROWS, nr), dtype)
    transposed = 4 * hidden * np.dtype(dtype).itemsize >= TRANSPOSE_MIN_ROW_BYTES
    d_a_t = aligned_empty((threads, 4 * hidden if transposed else 0, GRADIENT_BLOCK_ROWS), dtype)
    return scratch, d_a_t


def _weight_bytes(hidden, n_inputs, n_out, dtype):
    """Bytes of ``W_ih`` and ``W_hh`` together (``4H x (I + P)``): the size of the stacked
    weights of the forward pass and of a thread's partial weight gradients."""
    return 4 * hidden * (n_inputs + n_out) * np.dtype(dtype).itemsize


def _packed_gradients(hidden, n_inputs, n_out, dtype):
    """Whether the gradient GEMMs of a layer go to :func:`_gradient_gemms_packed` (else to
    :func:`_gradient_gemms`)."""
    return _weight_bytes(hidden, n_inputs, n_out, dtype) <= PACKED_GRADIENT_MAX_BYTES


@implements("d-input", "d-weights", backend="cpu")
@njit(cache=True, nogil=True, parallel=True)
def _gradient_gemms_packed(
    d_a, inputs, h_prev, w_ih_packed, d_x, d_w_ih, d_w_hh, d_bias, scratch, d_a_t, threads
):
    """The gradients that are sums over all steps, for layers with small weights.

    The arguments are those of :func:`_gradient_gemms`. Each thread takes its block of rows
    (steps and sequences) in blocks of ``GRADIENT_BLOCK_ROWS``: it computes that block's
    ``δx = δa W_ih``, transposes the block of ``δa`` (:func:`_d_a_transposed`), packs the
    block's rows of ``x`` and of ``h_{t-1}`` into ``scratch`` and adds ``δa^T x`` and
    ``δa^T h_{t-1}`` to its partial weight gradients, so that each block of ``δa`` is read
    from memory once, for all four products. The threads' partial sums are added at the
    end.
    """
    rows = d_a.shape[0]
    n_inputs, n_out = inputs.shape[1], h_prev.shape[1]
    block_rows = scratch.shape[2]
    input_panels = -(-n_inputs // scratch.shape[3])
    blocks = _blocks(rows, threads)
    part_w_ih = np.empty((blocks, *d_w_ih.shape), d_a.dtype)
    part_w_hh = np.empty((blocks, *d_w_hh.shape), d_a.dtype)
    part_bias = np.empty((blocks, d_bias.shape[0]), d_a.dtype)
    for k in prange(blocks):
        lo, hi = _block(k, blocks, rows)
        _zero(part_bias[k])
        for r0 in range(lo, hi, block_rows):
            r1 = min(r0 + block_rows, hi)
            d_a_block = d_a[r0:r1]
            packed_matmul(d_a_block, w_ih_packed, d_x[r0:r1], n_inputs, False)
            d_a_block_t = _d_a_transposed(d_a_block, d_a_t[k])
            x_packed = scratch[k, :input_panels, : r1 - r0]
            h_packed = scratch[k, input_panels:, : r1 - r0]
            pack(inputs[r0:r1], x_packed)
            pack(h_prev[r0:r1], h_packed)
            packed_matmul(d_a_block_t, x_packed, part_w_ih[k], n_inputs, r0 > lo)
            packed_matmul(d_a_block_t, h_packed, part_w_hh[k], n_out, r0 > lo)
            _add_rows(d_a_block, part_bias[k])
    _sum_parts(part_w_ih, d_w_ih)
    _sum_parts(part_w_hh, d_w_hh)
    _sum_parts(part_bias, d_bias)


@implements("d-projection-weights", backend="cpu")
@njit(cache=True, nogil=True, parallel=True)
def projection_weight_gradient(d_hs, r_seq, d_w_hr, threads):
    """``δW_hr = Σ_t δh_t^T r_t`` (rows of ``d_hs`` and ``r_seq`` are steps and sequences),
    split over threads by rows into partial sums like :func:`_gradient_gemms_packed`;
    called for projecting layers only."""
    rows = d_hs.shape[0]
    blocks = _blocks(rows, threads)
    part_w_hr = np.empty((blocks, *d_w_hr.shape), d_hs.dtype)
    for k in prange(blocks):
        lo, hi = _block(k, blocks, rows)
        np.dot(d_hs[lo:hi].T, r_seq[lo:hi], part_w_hr[k])
    _sum_parts(part_w_hr, d_w_hr)


@implements(
    "d-hidden",
    "d-projection",
    "d-output-gate",
    "d-cell",
    "d-input-gate",
    "d-forget-gate",
    "d-cell-candidate",
    "d-initial-state",
    "d-peephole-cell",
    "d-use-gate",
    "d-use-layer",
    "d-kept-memory",
    "d-ltm-stm-cell",
    "d-ltm-stm-forget-gate",
    backend="cpu",
)
@njit(cache=True, nogil=True, parallel=True)
def backward_kernel(
    x,
    w_hh_packed,
    w_hr,
    peephole,
    w_u,
    lengths,
    reverse,
    gates,
    c_seq,
    h_seq,
    r_seq,
    m_seq,
    u_seq,
    d_y,
    d_h,
    d_c,
    d_gates,
    d_hs,
    d_u,
    threads,
):
    """Backward time loop of one layer and one direction.

    Shapes and the other arguments up to ``u_seq`` are those of :func:`forward_kernel`
    (with the weights untransposed), as saved by a forward pass with ``C == T``,
    ``S == T + 1`` and ``R == T`` (with projection or the LTM/STM cell). The time loop runs
    on blocks of sequences in parallel, like the forward one. The sums over all steps, the
    input and weight gradients, are left to :func:`_gradient_gemms` (or
    :func:`_gradient_gemms_packed`), :func:`projection_weight_gradient` and
    :func:`cell_weight_gradients`. ``w_hr``, ``peephole`` and ``w_u`` are None for a cell
    that lacks them, as in :func:`forward_kernel`.

    Parameters
    ----------
    w_hh_packed : array
        ``W_hh`` (``4H x P``) packed by :func:`._packed.pack`, for the product
        ``δa_t W_hh`` at every step.
    d_y : (T, B, P) array
        Gradient at the output; ignored at padded steps.
    d_h : (B, P) array, in/out
        Enters holding ``δh_n``, leaves holding ``δh_0``.
    d_c : (B, H) array, in/out
        Enters holding ``δc_n``, leaves holding ``δc_0``.
    d_gates : (T, B, 4H) array, out
        ``δa_t``, the gradient at the gate pre-activations (zero at padded steps).
    d_hs : (T, B, P) array, out
        ``δh_t`` at every step, for the projection's weight gradient; ``(0, B, P)``
        without projection.
    d_u : (T, B, H) array, out
        The LTM/STM cell's ``δa^u_t``; ``(0, B, H)`` for another cell.
    threads : int
        Numba threads to split the work over.
    """
    steps_total, batch = x.shape[0], x.shape[1]
    hidden = c_seq.shape[2]
    n_out = h_seq.shape[2]
    d_r = d_h if w_hr is None else np.empty((batch, hidden), x.dtype)
    d_m = np.empty((batch, hidden), x.dtype)
    d_h_recurrent = np.empty(d_h.shape, x.dtype)
    blocks = _blocks(batch, threads)
    saved = _limit_threads(blocks)
    for k in prange(blocks):
        lo, hi = _block(k, blocks, batch)
        times = range(steps_total) if reverse else range(steps_total - 1, -1, -1)
        for t in times:
            prev = t + 1 if reverse else t
            cur = t if reverse else t + 1
            for b in range(lo, hi):
                if t < lengths[b]:
                    _add(d_y[t, b], d_h[b])
            if w_hr is not None:
                for b in range(lo, hi):
                    if t < lengths[b]:
                        _copy(d_h[b], d_hs[t, b])
                    else:
                        _zero(d_hs[t, b])
                np.dot(d_hs[t, lo:hi], w_hr, d_r[lo:hi])
            if w_u is not None:
                for b in range(lo, hi):
                    if t < lengths[b]:
                        use_gate_backward_row_ltm_stm(
                            u_seq[t, b],
                            gates[t, b, 3 * hidden :],
                            d_h[b],
                            d_u[t, b],
                            d_gates[t, b, 3 * hidden :],
                        )
                    else:
                        _zero(d_u[t, b])
                np.dot(d_u[t, lo:hi], w_u, d_m[lo:hi])
            for b in range(lo, hi):
                if t >= lengths[b]:
                    _zero(d_gates[t, b])
                    continue
                if peephole is not None:
                    cell_backward_row_peephole(
                        gates[t, b],
                        c_seq[prev, b],
                        c_seq[cur, b],
                        peephole,
                        d_r[b],
                        d_c[b],
                        d_gates[t, b],
                    )
                elif w_u is not None:
                    cell_backward_row_ltm_stm(
                        gates[t, b], c_seq[prev, b], d_m[b], d_c[b], d_gates[t, b]
                    )
                else:
                    cell_backward_row(
                        gates[t, b],
                        c_seq[prev, b],
                        c_seq[cur, b],
                        d_r[b],
                        d_c[b],
                        d_gates[t, b],
                        0,
                    )
            _recurrent_product(
                d_gates[t, lo:hi], w_hh_packed, d_h_recurrent[lo:hi], n_out, False, t
            )
            for b in range(lo, hi):
                if t < lengths[b]:
                    _copy(d_h_recurrent[b], d_h[b])
    _set_thread_count(saved)


@njit(cache=True, nogil=True, error_model="numpy")
def _peephole_sums(d_a, c_prev, c, d_peephole):
    """Add ``δa^i c_{t-1}``, ``δa^f c_{t-1}`` and ``δa^o c_t`` over rows into ``d_peephole``."""
    wide_vectors()
    hidden = c.shape[1]
    p_i, p_f, p_o = d_peephole[0], d_peephole[1], d_peephole[2]
    for row in range(c.shape[0]):
        d_a_i, d_a_f, _, d_a_o = _split_gates(d_a[row], hidden)
        c_prev_row, c_row = c_prev[row], c[row]
        for j in range(hidden):
            p_i[j] += d_a_i[j] * c_prev_row[j]
            p_f[j] += d_a_f[j] * c_prev_row[j]
            p_o[j] += d_a_o[j] * c_row[j]


@implements("d-peephole-weights", "d-use-weights", backend="cpu")
@njit(cache=True, nogil=True, parallel=True)
def cell_weight_gradients(d_a, c_prev, c, d_u, m, d_peephole, d_w_u, d_b_u, threads):
    """The cell variants' weight gradients, sums over all steps split over Numba's threads.

    Peephole: ``δp_i = Σ δa^i c_{t-1}``, ``δp_f = Σ δa^f c_{t-1}``, ``δp_o = Σ δa^o c_t``.
    LTM/STM: ``δW_u = Σ δa^u m_t^T`` (a GEMM) and ``δb_u = Σ δa^u``. Nothing for an empty
    ``d_peephole`` or ``d_w_u``.
    """
    rows = c.shape[0]
    peepholes = d_peephole.shape[0] > 0
    use_layer = d_w_u.shape[0] > 0
    blocks = _blocks(rows, threads)
    part_peephole = np.empty((blocks, d_peephole.shape[0], d_peephole.shape[1]), d_a.dtype)
    part_w_u = np.empty((blocks, d_w_u.shape[0], d_w_u.shape[1]), d_a.dtype)
    part_b_u = np.empty((blocks, d_b_u.shape[0]), d_a.dtype)
    for k in prange(blocks):
        lo, hi = _block(k, blocks, rows)
        _zero(part_peephole[k])
        _zero(part_b_u[k])
        if use_layer:
            np.dot(d_u[lo:hi].T, m[lo:hi], part_w_u[k])
            _add_rows(d_u[lo:hi], part_b_u[k])
        if peepholes:
            _peephole_sums(d_a[lo:hi], c_prev[lo:hi], c[lo:hi], part_peephole[k])
    _sum_parts(part_peephole, d_peephole)
    _sum_parts(part_w_u, d_w_u)
    _sum_parts(part_b_u, d_b_u)


class LayerTape(NamedTuple):
    """What the forward pass of one layer and direction saves for its backward pass."""

    x: np.ndarray
    w_ih: np.ndarray
    w_hh: np.ndarray
    w_hr: np.ndarray | None
    peephole: np.ndarray | None
    w_u: np.ndarray | None
    lengths: np.ndarray
    reverse: bool
    gates: np.ndarray
    c_seq: np.ndarray
    h_seq: np.ndarray
    r_seq: np.ndarray
    m_seq: np.ndarray
    u_seq: np.ndarray


class LayerGrads(NamedTuple):
    """Gradients of one layer and direction."""

    d_x: np.ndarray
    d_h0: np.ndarray
    d_c0: np.ndarray
    d_w_ih: np.ndarray
    d_w_hh: np.ndarray
    d_bias: np.ndarray
    d_w_hr: np.ndarray | None
    d_peephole: np.ndarray | None = None
    d_w_u: np.ndarray | None = None
    d_b_u: np.ndarray | None = None


#: Split each step by hidden units (:func:`forward_steps_by_units`) when the sequences
#: leave each thread fewer rows than this and ``W_hh`` is at least ``UNIT_SPLIT_MIN_BYTES``:
#: then one thread's share of ``W_hh`` stays in its cache, where all of it would not, and
#: that outweighs a meeting of the threads at every step. Measured float32 forward on 2
#: threads, by sequences -> by units, (T, B, I, H): (200, 8, 128, 512) 31 -> 23.5 ms,
#: (300, 1, 64, 512) 46 -> 14 ms, (100, 2, 256, 1024) 54 -> 50 ms; but (100, 8, 64, 256),
#: where all of W_hh (1 MB) fits, 2.5 -> 3.2 ms. Since both ways sweep the weights in
#: alternate orders (:data:`REVERSED_SWEEP_MIN_BYTES`), the forward pass gains up to 12
#: rows a thread: (100, 16, 128, 512) 0.91 of the time, (50, 16, 256, 1024) 0.85,
#: (100, 24, 128, 512) 0.99; (100, 32, 128, 512) 1.00.
UNIT_SPLIT_MAX_ROWS_FORWARD = 13
#: The same for the backward pass (:func:`backward_steps_by_units`), whose threads meet
#: twice a step: splitting it by units at 8 rows a thread too made (50, 16, 256, 1024)
#: training 1.04 of the time, the forward pass's gain included.
UNIT_SPLIT_MAX_ROWS = 8
UNIT_SPLIT_MIN_BYTES = 1 << 21
#: The forward pass also splits by units when the sequences leave each thread at most this
#: many rows and ``W_hh`` is at least ``UNIT_SPLIT_FEW_ROWS_MIN_BYTES``: with one row a
#: thread, the product streams all of ``W_hh`` from L2 at every step for little work, and
#: one thread's share of it streams in half the time (with a single sequence, by sequences
#: leaves the other threads idle as well). Measured float32 on 2 threads, by units over by
#: sequences, in-process A/B, (T, B, I, H): forward (100, 1, 128, 256) 0.81, (100, 2, 128,
#: 256) 0.87-0.89, but (100, 4, 128, 256) 0.99 and (100, 8, 128, 256) 1.28; training
#: (100, 1, 128, 256) 0.94-0.97 and (100, 2, 128, 256) 0.96-1.00. With ``W_hh`` of 576 KB,
#: (100, 1, 96, 192) forward 1.00-1.01 and (100, 2, 96, 192) 1.05.
UNIT_SPLIT_FEW_ROWS = 1
UNIT_SPLIT_FEW_ROWS_MIN_BYTES = 1 << 20


def _split_by_units(batch, hidden, weight_bytes, threads, max_rows, few_rows=0):
    """Whether to split each step by hidden units rather than by sequences: with fewer than
    ``max_rows`` rows a thread and ``W_hh`` of ``UNIT_SPLIT_MIN_BYTES``, or at most
    ``few_rows`` and ``UNIT_SPLIT_FEW_ROWS_MIN_BYTES``."""
    rows = -(-batch // threads)
    return (
        threads > 1
        and hidden >= threads
        and (
            (rows < max_rows and weight_bytes >= UNIT_SPLIT_MIN_BYTES)
            or (rows <= few_rows and weight_bytes >= UNIT_SPLIT_FEW_ROWS_MIN_BYTES)
        )
    )


#: Inference keeps the packed ``[W_ih^T; W_hh^T]`` of this many recent (layer, direction)
#: weights of the stacked path (at most :data:`STACKED_WEIGHTS_MAX_BYTES` each, with a copy
#: of the weights to compare with), and reuses it while the weights hold the same values:
#: packing ``W^T`` reads it across ``W``'s rows (8 us at (I, H) = (32, 64), float32), and
#: the threads then read what one of them has just written. Comparing costs 2 us there.
#: Float32 (T, B, I, H) = (50, 16, 32, 64) inference, of about 230 us: 3-8 % faster
#: (in-process A/B, both orders); a cache without the comparison was 9-13 %. Training packs
#: at every call (its weights change at every step; comparing and copying them would only
#: add to it).
PACKED_CACHE_ENTRIES = 16


class _PackedWeights(NamedTuple):
    """An entry of the cache of :func:`_stacked_weights`."""

    w_ih: weakref.ref  # the arrays packed (dropping one drops the entry)
    w_hh: weakref.ref
    values: tuple  # copies of their values when packed
    packed: np.ndarray


_packed_cache: dict = {}
# Reentrant: dropping an array calls ``forget`` (below), which may happen in the thread
# that holds the lock, when a collection runs inside it.
_packed_cache_lock = threading.RLock()


@njit(cache=True, nogil=True)
def _same_bits(a, b):
    """Whether C-contiguous ``a`` and ``b``, of one shape and dtype and a multiple of 8
    bytes, hold the same bits (unlike ``==``, this tells ``-0.0`` from ``0.0`` and finds a
    NaN equal to itself). One pass without an early exit, which LLVM vectorises: 1.3 us
    for 64 KB, 10 with an exit after each 4 KB."""
    a_words, b_words = a.reshape(-1).view(np.int64), b.reshape(-1).view(np.int64)
    difference = 0
    for j in range(a_words.shape[0]):
        difference |= a_words[j] ^ b_words[j]
    return difference == 0


def _unchanged(copy, w):
    """Whether ``w`` still holds the values of ``copy`` (a reshape or a new dtype of the
    same array, in place, counts as a change; so does any array :func:`_same_bits` does
    not take, which the weights, of ``4H`` rows, never are)."""
    return (
        copy.shape == w.shape
        and copy.dtype == w.dtype
        and copy.nbytes % 8 == 0
        and _same_bits(copy, w)
    )


def _pack_stacked(w_ih, w_hh):
    """``[W_ih^T; W_hh^T]`` packed, for :func:`forward_kernel`'s stacked path."""
    n_inputs = w_ih.shape[1]
    packed = empty_packed(n_inputs + w_hh.shape[1], w_hh.shape[0], w_ih.dtype)
    pack(w_ih.T, packed[:, :n_inputs])
    pack(w_hh.T, packed[:, n_inputs:])
    return packed


def _stacked_weights(w_ih, w_hh):
    """:func:`_pack_stacked`, reusing the result of an earlier call while ``w_ih`` and
    ``w_hh`` are the same arrays with the same values, bit for bit (see
    :data:`PACKED_CACHE_ENTRIES`, 0 to keep none). Weights changed in place are packed
    afresh."""
    if PACKED_CACHE_ENTRIES <= 0 or not (w_ih.flags.c_contiguous and w_hh.flags.c_contiguous):
        return _pack_stacked(w_ih, w_hh)
    key = (id(w_ih), id(w_hh))
    entry = _packed_cache.get(key)
    if (
        entry is not None
        and entry.w_ih() is w_ih
        and entry.w_hh() is w_hh
        and _unchanged(entry.values[0], w_ih)
        and _unchanged(entry.values[1], w_hh)
    ):
        with _packed_cache_lock:  # most recently used last
            if _packed_cache.pop(key, None) is not None:
                _packed_cache[key] = entry
        return entry.packed
    packed = _pack_stacked(w_ih, w_hh)

    def forget(_, key=key):
        with _packed_cache_lock:
            _packed_cache.pop(key, None)

    entry = _PackedWeights(
        weakref.ref(w_ih, forget), weakref.ref(w_hh, forget), (w_ih.copy(), w_hh.copy()), packed
    )
    with _packed_cache_lock:
        _packed_cache.pop(key, None)
        _packed_cache[key] = entry
        while len(_packed_cache) > PACKED_CACHE_ENTRIES:  # least recently used first
            _packed_cache.pop(next(iter(_packed_cache)), None)
    return packed


@njit(cache=True, nogil=True)
def _pack_padded(w, packed):
    """:func:`._packed.pack` ``w`` into the first panels of ``packed`` and zeros into the
    rest (a block of units narrower than the widest)."""
    panels = -(-w.shape[1] // packed.shape[2])
    pack(w, packed[:panels])
    _zero(packed[panels:])


# Each thread packs the block of units it multiplies by in the time loop, so that the block
# is in its cache when the loop starts, instead of one thread packing them all and the
# others reading theirs from it: float32 (T, B, I, H) = (200, 8, 128, 512) forward 7-8.5 %
# faster (in-process A/B), of which the packing itself (4 MB, 0.45 ms on one thread) is
# less than half. With Numba's OpenMP layer (the one here), whose static schedule gives
# iteration k of both loops to the same thread; with another, the packing is only shared.


@njit(cache=True, nogil=True, parallel=True)
def _pack_units_forward(w_hh, packed):
    """Fill :func:`_unit_blocks_forward`'s ``packed``, block ``k`` by thread ``k``."""
    blocks, hidden = packed.shape[0], w_hh.shape[0] // 4
    for k in prange(blocks):
        lo, hi = _block(k, blocks, hidden)
        for g in range(4):
            _pack_padded(w_hh[g * hidden + lo : g * hidden + hi].T, packed[k, g])


@njit(cache=True, nogil=True, parallel=True)
def _pack_units_backward(w_hh, packed):
    """Fill :func:`_unit_blocks_backward`'s ``packed``, block ``k`` by thread ``k``."""
    blocks, hidden = packed.shape[0], w_hh.shape[0] // 4
    for k in prange(blocks):
        lo, hi = _block(k, blocks, hidden)
        _pack_padded(w_hh[:, lo:hi], packed[k])


def _unit_blocks_forward(w_hh, blocks):
    """``W_hh^T`` by blocks of hidden units, for :func:`forward_steps_by_units`: ``[k, g]``
    holds the columns of gate ``g`` for the units ``_block(k, blocks, H)``, so that each
    product accumulates straight into that gate's columns of the gate rows."""
    hidden, dtype = w_hh.shape[0] // 4, w_hh.dtype
    widest = -(-hidden // blocks)
    packed = aligned_empty((blocks, 4, *packed_shape(w_hh.shape[1], widest, dtype)), dtype)
    _pack_units_forward(w_hh, packed)
    return packed


def _unit_blocks_backward(w_hh, blocks):
    """``W_hh`` by blocks of hidden units, for :func:`backward_steps_by_units`: block ``k``
    is ``W_hh[:, lo:hi]`` for the units ``_block(k, blocks, H)``."""
    hidden, dtype = w_hh.shape[0] // 4, w_hh.dtype
    widest = -(-hidden // blocks)
    packed = aligned_empty((blocks, *packed_shape(w_hh.shape[0], widest, dtype)), dtype)
    _pack_units_backward(w_hh, packed)
    return packed


def layer_forward(
    x,
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    w_hr,
    h0,
    c0,
    lengths,
    reverse,
    save,
    peephole=None,
    w_u=None,
    b_u=None,
):
    """Run one layer and direction forward (entry point shared by every backend).

    Parameters
    ----------
    x : (T, B, I) array
    w_ih, w_hh : (4H, I), (4H, P) arrays
    b_ih, b_hh : (4H,) arrays, or both None
        The biases (None: none); the input projection adds their sum.
    w_hr : (P, H) array or None
        Projection weights.
    h0, c0 : (B, P), (B, H) arrays, or None
        Initial states (None: zeros).
    lengths : (B,) int64 array
    reverse : bool
    save : bool
        Keep what the backward pass needs (the tape); otherwise use memory independent
        of ``T`` beyond the output.
    peephole : (3, H) array or None
        The peephole cell's weights (rows i, f, o); None for another cell.
    w_u, b_u : (H, H), (H,) arrays or None
        The LTM/STM cell's use layer (``b_u`` zeros without bias); None for another cell.

    Returns
    -------
    y : (T, B, P) array
    h_n, c_n : (B, P), (B, H) arrays
    tape : LayerTape or None
    """
    hidden = w_hh.shape[0] // 4
    n_out = w_hh.shape[1]
    dtype = x.dtype
    bias = np.zeros(4 * hidden, dtype) if b_ih is None else np.add(b_ih, b_hh)
    # The kernels take None for a part the cell does not have: Numba prunes the branches
    # that test it, so that each cell compiles (and caches) only its own code.
    w_hr_t = None if w_hr is None else np.ascontiguousarray(w_hr.T)
    w_u_t = None if w_u is None else np.ascontiguousarray(w_u.T)
    standard = w_hr is None and peephole is None and w_u is None
    threads = get_num_threads()
    by_units = standard and _split_by_units(
        len(lengths),
        hidden,
        w_hh.nbytes,
        threads,
        UNIT_SPLIT_MAX_ROWS_FORWARD,
        UNIT_SPLIT_FEW_ROWS,
    )
    n_inputs = w_ih.shape[1]
    stacked = (
        not by_units
        and _weight_bytes(hidden, n_inputs, n_out, dtype) <= STACKED_WEIGHTS_MAX_BYTES
        and len(lengths) >= threads  # else the projection pass is what uses every thread
    )
    step_bytes = x.shape[1] * 4 * hidden * x.itemsize  # one step's gate rows
    gates, c_seq, h_seq, r_seq, m_seq, u_seq, y, first, last = _layout.allocate(
        ALIGNED,
        x,
        hidden,
        n_out,
        save=save,
        reverse=reverse,
        projecting=w_hr is not None,
        use_layer=w_u is not None,
        chunk=INFERENCE_STACKED_CHUNK
        if stacked
        else max(1, min(INFERENCE_CHUNK, INFERENCE_GATE_BYTES // step_bytes)),
    )
    c_seq[first] = 0 if c0 is None else c0
    h_seq[first] = 0 if h0 is None else h0
    # In inference with every sequence at full length, h_t goes straight into y[t].
    h_in_y = not save and int(lengths.min()) == len(x)
    if stacked:
        w_ih_packed = None
        w_hh_packed = _pack_stacked(w_ih, w_hh) if save else _stacked_weights(w_ih, w_hh)
    else:
        w_ih_packed = empty_packed(*w_ih.T.shape, dtype)
        pack(w_ih.T, w_ih_packed)
        if not by_units:
            w_hh_packed = empty_packed(*w_hh.T.shape, dtype)
            pack(w_hh.T, w_hh_packed)
    if by_units:
        w_hh_units = _unit_blocks_forward(w_hh, threads)
        chunk = gates.shape[0]
        for n in range(-(-len(x) // chunk)):
            t_lo, t_hi = _layout.chunk_bounds(n, chunk, len(x), reverse)
            _input_projection(x, w_ih_packed, bias, gates, t_lo, t_hi, threads)
            forward_steps_by_units(
                t_lo, t_hi, reverse, gates, w_hh_units, lengths, c_seq, h_seq, y, h_in_y
            )
    else:
        # Only the projection's and the use layer's per-step products call BLAS in the
        # forward pass; limiting its threads costs about 10 us per call, a tenth of a
        # short one.
        with single_threaded_blas() if not standard else nullcontext(), _ThreadsKept(threads):
            forward_kernel(
                x,
                w_ih_packed,
                w_hh_packed,
                bias,
                w_hr_t,
                peephole,
                w_u_t,
                b_u,
                lengths,
                reverse,
                gates,
                c_seq,
                h_seq,
                r_seq,
                m_seq,
                u_seq,
                y,
                h_in_y,
                threads,
            )
    tape = None
    if save:
        tape = LayerTape(
            x,
            w_ih,
            w_hh,
            w_hr,
            peephole,
            w_u,
            lengths,
            reverse,
            gates,
            c_seq,
            h_seq,
            r_seq,
            m_seq,
            u_seq,
        )
    h_n = y[0 if reverse else -1] if h_in_y else h_seq[last]
    return y, h_n.copy(), c_seq[last].copy(), tape


def layer_backward(tape, d_y, d_h_n, d_c_n):
    """Backward of :func:`layer_forward` (entry point shared by every backend).

    Parameters
    ----------
    tape : LayerTape
        What :func:`layer_forward` saved.
    d_y : (T, B, P) array
        Gradient at the layer's output.
    d_h_n, d_c_n : (B, P), (B, H) arrays, or None
        Gradients at the final states (None: zeros).

    Returns
    -------
    LayerGrads
        With ``d_peephole``, ``d_w_u`` and ``d_b_u`` for the cells that have them.
    """
    x, w_ih, w_hh, w_hr = tape.x, tape.w_ih, tape.w_hh, tape.w_hr
    dtype = x.dtype
    projecting = w_hr is not None
    peepholes = tape.peephole is not None
    use_layer = tape.w_u is not None
    batch, hidden, n_out = x.shape[1], w_hh.shape[0] // 4, w_hh.shape[1]
    d_h = np.zeros((batch, n_out), dtype) if d_h_n is None else np.array(d_h_n, dtype, copy=True)
    d_c = np.zeros((batch, hidden), dtype) if d_c_n is None else np.array(d_c_n, dtype, copy=True)
    d_gates = aligned_empty(tape.gates.shape, dtype)
    d_hs = aligned_empty((len(x) if projecting else 0, *d_h.shape), dtype)
    d_u = aligned_empty(tape.u_seq.shape, dtype)
    d_x = aligned_empty(x.shape, dtype)
    d_w_ih = np.empty(w_ih.shape, dtype)
    d_w_hh = np.empty(w_hh.shape, dtype)
    d_bias = np.empty(w_ih.shape[0], dtype)
    w_ih_packed = empty_packed(*w_ih.shape, dtype)
    pack(w_ih, w_ih_packed)
    threads = get_num_threads()
    hidden = w_hh.shape[0] // 4
    n_inputs, n_out = w_ih.shape[1], w_hh.shape[1]
    standard = not (projecting or peepholes or use_layer)
    by_units = standard and _split_by_units(
        len(tape.lengths), hidden, w_hh.nbytes, threads, UNIT_SPLIT_MAX_ROWS
    )
    if by_units:
        w_hh_units = _unit_blocks_backward(w_hh, threads)
        backward_steps_by_units(
            tape.reverse, tape.gates, tape.c_seq, w_hh_units, tape.lengths, d_y, d_h, d_c, d_gates
        )
    else:
        w_hh_packed = empty_packed(*w_hh.shape, dtype)
        pack(w_hh, w_hh_packed)
        # Only the projection's and the use layer's per-step products call BLAS.
        with single_threaded_blas() if not standard else nullcontext(), _ThreadsKept(threads):
            backward_kernel(
                x,
                w_hh_packed,
                w_hr,
                tape.peephole,
                tape.w_u,
                tape.lengths,
                tape.reverse,
                tape.gates,
                tape.c_seq,
                tape.h_seq,
                tape.r_seq,
                tape.m_seq,
                tape.u_seq,
                d_y,
                d_h,
                d_c,
                d_gates,
                d_hs,
                d_u,
                threads,
            )
    steps = len(x)
    h_prev = tape.h_seq[1:] if tape.reverse else tape.h_seq[:steps]
    gemm_args = (
        d_gates.reshape(-1, 4 * hidden),
        x.reshape(-1, n_inputs),
        h_prev.reshape(-1, n_out),
        w_ih_packed,
        d_x.reshape(-1, n_inputs),
        d_w_ih,
        d_w_hh,
        d_bias,
    )
    work = gradient_work(threads, n_inputs, n_out, hidden, dtype)
    if _packed_gradients(hidden, n_inputs, n_out, dtype):
        _gradient_gemms_packed(*gemm_args, *work, threads)
    else:
        _gradient_gemms(*gemm_args, *work, threads)
    d_w_hr = d_peephole = d_w_u = d_b_u = None
    if projecting:
        d_w_hr = np.empty(w_hr.shape, dtype)
        with single_threaded_blas():
            projection_weight_gradient(
                d_hs.reshape(-1, w_hr.shape[0]), tape.r_seq.reshape(-1, hidden), d_w_hr, threads
            )
    if peepholes or use_layer:
        c_seq = tape.c_seq
        c_prev = c_seq[1:] if tape.reverse else c_seq[:steps]
        c_cur = c_seq[:steps] if tape.reverse else c_seq[1:]
        # cell_weight_gradients skips the part of an empty array.
        d_peephole = np.empty((3, hidden) if peepholes else (0, 0), dtype)
        d_w_u = np.empty((hidden, hidden) if use_layer else (0, 0), dtype)
        d_b_u = np.empty(hidden if use_layer else 0, dtype)
        with single_threaded_blas():
            cell_weight_gradients(
                d_gates.reshape(-1, 4 * hidden),
                c_prev.reshape(-1, hidden),
                c_cur.reshape(-1, hidden),
                d_u.reshape(-1, hidden),
                tape.m_seq.reshape(-1, hidden),
                d_peephole,
                d_w_u,
                d_b_u,
                threads,
            )
        if not peepholes:
            d_peephole = None
        if not use_layer:
            d_w_u = d_b_u = None
    return LayerGrads(d_x, d_h, d_c, d_w_ih, d_w_hh, d_bias, d_w_hr, d_peephole, d_w_u, d_b_u)
