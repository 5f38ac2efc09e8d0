"""Every CUDA kernel compiles to PTX for sm_80 and sm_90, in float32 and float64.

The simulator runs kernels as Python, which accepts code the CUDA compiler would reject;
this test compiles each kernel for real. It needs numba-cuda (``numba-cuda[cu13]`` brings
the compiler) but no GPU, and must run without ``NUMBA_ENABLE_CUDASIM``.

Kernels are enumerated from the backend's table :data:`numlstm.backends.cuda.KERNEL_SIGNATURES`
(each kernel's argument types), which is cross-checked against the kernels the modules
define and against the equation registry, so a new kernel cannot be missed.

Why the shim: compiling a kernel that calls another function (the shared ``@njit`` gate
functions of :mod:`numlstm.gates`) makes numba-cuda ask the current device for its compute
capability, which needs a driver. ``compile_ptx`` is given the capability explicitly, so
the test answers that question with the same capability (numba-cuda 0.30).
"""

from __future__ import annotations

from types import SimpleNamespace

import numba.cuda.dispatcher
import pytest
from numba import cuda, types
from numba.cuda.dispatcher import CUDADispatcher

from numlstm.backends import cuda as cuda_backend
from numlstm.backends import cuda_array
from numlstm.equations import KERNELS

CAPABILITIES = [(8, 0), (9, 0)]
FLOATS = [types.float32, types.float64]


def defined_kernels():
    """Every CUDA kernel defined at the top level of the backend's modules (device
    functions are compiled into the kernels that call them)."""
    return {
        value
        for module in (cuda_backend, cuda_array)
        for value in vars(module).values()
        if isinstance(value, CUDADispatcher) and not value.targetoptions.get("device")
    }


def test_the_kernel_table_lists_every_kernel_the_modules_define():
    assert defined_kernels() == set(cuda_backend.KERNEL_SIGNATURES)


def test_every_registered_cuda_kernel_is_in_the_table():
    registered = {kernel.function for kernel in KERNELS if kernel.backend == "cuda"}
    assert registered, "no CUDA kernel declared its equations with @implements"
    assert registered <= set(cuda_backend.KERNEL_SIGNATURES)


def test_the_time_loops_and_gemm_declare_their_equations():
    registered = {kernel.function for kernel in KERNELS if kernel.backend == "cuda"}
    for kernel in (cuda_backend.gemm_kernel, cuda_backend.forward_loop, cuda_backend.backward_loop):
        assert kernel in registered and kernel.equations


@pytest.mark.parametrize("cc", CAPABILITIES, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("float_type", FLOATS, ids=str)
@pytest.mark.parametrize(
    "kernel", list(cuda_backend.KERNEL_SIGNATURES), ids=lambda k: k.py_func.__name__
)
def test_kernel_compiles_to_ptx(kernel, float_type, cc, monkeypatch):
    device = SimpleNamespace(compute_capability=cc)
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device", lambda: device)
    signature = cuda_backend.KERNEL_SIGNATURES[kernel](float_type)
    ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if float_type == types.float32:  # float32 kernels compute in float32 throughout
        assert ".f64" not in ptx
