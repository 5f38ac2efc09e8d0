"""Configuration of the CUDA test lane, which runs as a pytest process of its own.

Two ways to run it:

* ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests_cuda`` on any machine: the kernels run in
  Numba's CUDA simulator (the variable must be set before Numba is imported, hence a
  process of its own). The PTX test is left out: it needs the real compiler, which the
  simulator replaces; run it in a process without the variable (``python -m pytest
  tests_cuda/test_ptx.py``, no GPU needed).
* ``python -m pytest tests_cuda`` on a machine with a CUDA GPU: everything, with the
  production launch sizes and several blocks per grid.

Anywhere else the kernel tests stop the run with an error that says so, rather than skip.
The helpers of ``tests/`` (the NumPy reference, the random cases, the tolerance table) are
shared through ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))


def _load_main_conftest():
    """``tests/conftest.py`` under another name (this file is ``conftest`` here)."""
    spec = importlib.util.spec_from_file_location("numlstm_tests_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_main = _load_main_conftest()
# Re-exported, so that the helpers of tests/ that import them from ``conftest`` find them.
TOLERANCE = _main.TOLERANCE
FD_STEP = _main.FD_STEP
FD_RTOL = _main.FD_RTOL
assert_close = _main.assert_close
central_differences = _main.central_differences
default_backend = _main.default_backend

from numba import config, cuda  # noqa: E402

import numlstm  # noqa: E402
from numlstm.backends import cuda as cuda_backend  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU = not SIMULATOR and cuda.is_available()

if SIMULATOR != bool(config.ENABLE_CUDASIM):  # pragma: no cover - a misconfigured run
    raise pytest.UsageError(
        "NUMBA_ENABLE_CUDASIM=1 must be set before Numba is imported: run tests_cuda in a "
        "pytest process of its own, with the variable in its environment"
    )

#: Files that need the real CUDA compiler rather than the simulator.
PTX_TESTS = ("test_ptx.py",)

collect_ignore = list(PTX_TESTS) if SIMULATOR else []

__all__ = [
    "FD_RTOL",
    "FD_STEP",
    "GPU",
    "SIMULATOR",
    "TOLERANCE",
    "assert_close",
    "central_differences",
    "default_backend",
    "to_host",
]


def pytest_report_header(config):
    mode = "CUDA simulator" if SIMULATOR else ("GPU" if GPU else "no GPU: PTX tests only")
    return f"numlstm CUDA lane: {mode}; cuda backend: {numlstm.available_backends()['cuda']}"


def pytest_collection_modifyitems(config, items):
    if SIMULATOR or GPU:
        return
    needing_kernels = [item.nodeid for item in items if item.path.name not in PTX_TESTS]
    if needing_kernels:
        raise pytest.UsageError(
            "tests_cuda runs the CUDA kernels, which need a GPU or the CUDA simulator: set "
            "NUMBA_ENABLE_CUDASIM=1 in the environment of a pytest process of its own, or "
            f"run on a machine with a CUDA GPU (without either, only {PTX_TESTS} can run); "
            f"asked for {needing_kernels[:3]}..."
        )


def _simulated_cuda_array_interface(self):
    """What a real device array reports, for the simulator's stand-in (host memory)."""
    interface = self._ary.__array_interface__
    return {
        "shape": interface["shape"],
        "typestr": interface["typestr"],
        "data": interface["data"],
        "strides": interface["strides"],
        "version": 3,
    }


if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    # Real Numba device arrays carry __cuda_array_interface__, which numlstm uses to tell
    # CUDA arrays from host arrays; the simulator's stand-in does not, so give it one.
    FakeCUDAArray.__cuda_array_interface__ = property(_simulated_cuda_array_interface)
    # The simulator runs every CUDA thread as a Python thread, which hand over the GIL at
    # each barrier; Python's default 5 ms switch interval makes every wait that long.
    sys.setswitchinterval(1e-4)


#: Launch sizes. The simulator needs few threads per block (each is a Python thread) and
#: tiny GEMM tiles, so that tiny matrices still span several tiles and threads loop over
#: several units: set for the whole session. A GPU runs the production sizes, with the
#: blocks of a grid capped at 1, 2 or as many as fit (the ``launch`` fixture), so that
#: units are shared unevenly among blocks.
def _lock_the_simulators_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` safe for threads that ask at once.

    numba-cuda's simulator (``simulator.kernelapi.FakeCUDAShared.array``, 0.30.4) gives a
    block's threads one array per calling line, made by the first thread that asks, with
    no lock: two threads that ask at the same moment can each make their own, and their
    partial sums then never meet (seen: 2 failures in 5 runs of a parity test with 64
    threads a block; none in 12 runs with this lock). A GPU has no such race. This is the
    simulator's own code with a lock around it; the calling line is found the same way.
    """
    import threading
    import traceback

    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()
    array = kernelapi.FakeCUDAShared.array

    def locked_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or an error
            return array(self, shape, dtype, alignment)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]
        with lock:
            if caller not in self._allocations:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                self._allocations[caller] = np.empty(shape, dtype)
            return self._allocations[caller]

    kernelapi.FakeCUDAShared.array = locked_array


if SIMULATOR:
    _lock_the_simulators_shared_arrays()
    cuda_backend.THREADS = 4
    # Small GEMM tiles (4 x 4 and 8 x 8 on blocks of 2 x 2 threads), so that small
    # products span several tiles and the simulator runs few threads.
    cuda_backend.gemm_kernel = cuda_backend._make_gemm_kernel(2, 2, 4)
    cuda_backend.gemm_kernel_wide = cuda_backend._make_gemm_kernel(2, 4, 4, "gemm_kernel_wide")
    cuda_backend.BATCH_TILE = 2  # the test batches (3, 4) make whole and partial tiles
    cuda_backend.cuda_array.THREADS = 8
    BLOCK_CAPS = [None]  # the simulator runs cooperative grids of one block
else:
    BLOCK_CAPS = [1, 2, None]


#: Threads per block of the time-loop kernels in the parity tests: few, so that each
#: thread computes whole dot products (more (sequence, unit) items than threads), and
#: many, so that groups of threads share each dot product (fewer items than threads).
THREAD_COUNTS = [4, 64] if SIMULATOR else [32, 256]


#: The time loops' modes (see ``numlstm.backends.cuda._forward_grid``) with the thread
#: counts each is tested at: the grouped mode at both, the tiled modes (whose threads each
#: take whole dot products) at the larger only in the simulator, which is slow.
LOOP_CONFIGS = [(count, "grouped") for count in THREAD_COUNTS] + [
    (count, "tiled") for count in (THREAD_COUNTS[-1:] if SIMULATOR else THREAD_COUNTS)
]


@pytest.fixture(params=LOOP_CONFIGS, ids=lambda config: f"threads={config[0]}-{config[1]}")
def loop_config(request, monkeypatch):
    """Threads per block and mode of the time loops for a test: grouped for every batch,
    or tiled for every batch."""
    threads, mode = request.param
    monkeypatch.setattr(cuda_backend, "THREADS", threads)
    monkeypatch.setattr(cuda_backend, "TILED_MIN_ITEMS", 1 << 62 if mode == "grouped" else 1)
    return request.param


@pytest.fixture(params=BLOCK_CAPS, ids=lambda cap: f"max_blocks={cap}")
def launch(request, monkeypatch):
    """The CUDA backend's cap on blocks per grid for a test, restored afterwards."""
    monkeypatch.setattr(cuda_backend, "MAX_BLOCKS", request.param)
    return request.param


@pytest.fixture
def on_backend():
    """Run a callable with the process-wide default backend set, then restore it."""

    def run(backend, function, *args, **kwargs):
        numlstm.set_backend(backend)
        try:
            return function(*args, **kwargs)
        finally:
            numlstm.set_backend(None)

    return run


def to_host(array):
    """A NumPy copy of a (NumPy or device) array."""
    return np.asarray(array) if isinstance(array, np.ndarray) else array.copy_to_host()
