"""The CUDA backend's GEMM kernels equal NumPy's product in every orientation, and its column
sums (the bias gradients) NumPy's sums."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import to_host
from numba import cuda

from numlstm.backends import cuda as cuda_backend


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("wide", [False, True], ids=["gemm_kernel", "gemm_kernel_wide"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "a^T"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "b^T"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gemm_equals_numpy(dtype, wide, trans_a, trans_b, with_bias, monkeypatch):
    # Sizes that are no multiple of any tile edge, depth or thread count.
    rows, cols, depth = 19, 13, 23
    monkeypatch.setattr(cuda_backend, "GEMM_WIDE_MIN_BLOCKS", 0 if wide else 1 << 30)
    rng = np.random.default_rng(7)
    a = rng.standard_normal((depth, rows) if trans_a else (rows, depth)).astype(dtype)
    b = rng.standard_normal((cols, depth) if trans_b else (depth, cols)).astype(dtype)
    bias = rng.standard_normal(cols).astype(dtype) if with_bias else None
    bias2 = rng.standard_normal(cols).astype(dtype) if with_bias else None
    expected = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if with_bias:
        expected = expected + bias + bias2
    c = cuda.to_device(np.full((rows, cols), np.nan, dtype))  # every value must be written
    cuda_backend.gemm(
        cuda.to_device(a),
        cuda.to_device(b),
        c,
        None if bias is None else cuda.to_device(bias),
        trans_a=trans_a,
        trans_b=trans_b,
        bias2=None if bias2 is None else cuda.to_device(bias2),
    )
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(to_host(c), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_column_sums_equal_numpy(dtype):
    # Rows no multiple of the kernel's 8 rows of threads, columns of its 32-wide blocks.
    a = np.random.default_rng(3).standard_normal((37, 45)).astype(dtype)
    sums = to_host(cuda_backend._column_sums(cuda.to_device(a)))
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(sums, a.sum(axis=0), rtol=tolerance, atol=tolerance)
