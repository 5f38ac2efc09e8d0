"""Tests for the packed-weight GEMM (numlstm.backends._packed)."""

import textwrap

import llvmlite.binding as llvm
import numba
import numpy as np
import pytest
from conftest import run_twice_in_new_processes
from hypothesis import given, settings
from hypothesis import strategies as st

from numlstm.backends._packed import (
    empty_packed,
    pack,
    packed_matmul,
    packed_shape,
    panel_width,
    transpose,
)

DTYPES = [np.float32, np.float64]
SENTINEL = -7.25  # written into every element that packed_matmul must not touch


def forward_error_bound(rows, w):
    """Bound on ``|fl(rows @ w) - rows @ w|`` for one float product, per element.

    Each element is a dot product of length K; whatever the order of the sums and with or
    without fused multiply-adds, its rounding error is at most ``gamma_K |rows| @ |w|``
    with ``gamma_K = K u / (1 - K u)``, ``u = eps / 2`` (Higham, *Accuracy and Stability
    of Numerical Algorithms*, 2nd ed., eq. 3.5). We allow ``(K + 2) eps``, which covers
    that bound for the kernel plus a second one for a reference computed in the same dtype.
    """
    k = rows.shape[1]
    eps = np.finfo(rows.dtype).eps
    scale = np.abs(rows).astype(np.float64) @ np.abs(w).astype(np.float64)
    return (k + 2) * eps * scale + np.finfo(rows.dtype).tiny


def run_case(
    dtype, m, k, n, *, row_step=1, offset=0, accumulate=False, transposed=False, k0=0, seed=0
):
    """Pack a random W, run packed_matmul on strided views, return (out, expected, bound).

    ``transposed`` takes ``rows`` as the transpose of a slice of a larger array (the
    gradient pass's ``δa^T``); ``k0 > 0`` packs ``k0 + k + 3`` rows of a larger W and
    multiplies by the slice ``packed[:, k0 : k0 + k]``.
    """
    rng = np.random.default_rng(seed)
    w_big = rng.standard_normal((k0 + k + 3 if k0 else k, n)).astype(dtype)
    w = w_big[k0 : k0 + k]
    packed_big = empty_packed(*w_big.shape, dtype)
    packed_big.fill(np.nan)  # pack must overwrite every element, padding included
    pack(w_big, packed_big)
    packed = packed_big[:, k0 : k0 + k]
    # rows: a strided row slice of a larger C-contiguous array (row stride > K), or the
    # transpose of such a slice (stride along K > 1).
    if transposed:
        big_rows = rng.standard_normal((k + offset + 2, row_step * m + 3)).astype(dtype)
        rows = big_rows[offset : offset + k, 1 : 1 + row_step * m : row_step].T
    else:
        big_rows = rng.standard_normal((row_step * m + 3, k + offset + 2)).astype(dtype)
        rows = big_rows[1 : 1 + row_step * m : row_step, offset : offset + k]
    # out: a window of a larger array; everything outside out[:, :n] is a sentinel.
    big_out = np.full((m + 2, offset + n + 5), SENTINEL, dtype)
    out = big_out[1 : 1 + m, offset:]
    start = rng.standard_normal((m, n)).astype(dtype)
    out[:, :n] = start
    before = big_out.copy()
    packed_matmul(rows, packed, out, n, accumulate)

    touched = np.zeros(big_out.shape, dtype=bool)
    touched[1 : 1 + m, offset : offset + n] = True
    np.testing.assert_array_equal(big_out[~touched], before[~touched])

    expected = rows.astype(np.float64) @ w.astype(np.float64)
    bound = forward_error_bound(rows, w)
    if accumulate:
        expected += start
        bound += np.finfo(dtype).eps * (np.abs(expected) + np.abs(start))
    return out[:, :n], expected, bound


@pytest.mark.parametrize("dtype", DTYPES)
def test_panel_width_and_shape(dtype):
    nr = panel_width(dtype)
    assert nr * np.dtype(dtype).itemsize == 128  # two 64-byte vectors
    assert packed_shape(5, 1, dtype) == (1, 5, nr)
    assert packed_shape(5, nr, dtype) == (1, 5, nr)
    assert packed_shape(5, nr + 1, dtype) == (2, 5, nr)
    packed = empty_packed(7, 3 * nr - 2, dtype)
    assert packed.shape == (3, 7, nr) and packed.dtype == dtype
    assert packed.flags.c_contiguous and packed.ctypes.data % 64 == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_layout_and_zero_padding(dtype):
    k, n = 5, 2 * panel_width(dtype) + 3
    nr = panel_width(dtype)
    w = np.arange(k * n, dtype=dtype).reshape(k, n) + 1
    packed = np.full(packed_shape(k, n, dtype), np.nan, dtype)
    pack(w, packed)
    for p in range(packed.shape[0]):
        width = min(nr, n - p * nr)
        np.testing.assert_array_equal(packed[p, :, :width], w[:, p * nr : p * nr + width])
        np.testing.assert_array_equal(packed[p, :, width:], 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("k", [1, 5, 8, 13, 37])
def test_pack_reads_every_layout_of_w(dtype, layout, k):
    """Contiguous rows (copied a panel row at a time), a transpose (each panel transposed
    by tiles in registers) and a strided view (in tiles of 8 rows of ``k`` and the rest),
    into a slice of a larger packed buffer."""
    nr = panel_width(dtype)
    n = 2 * nr + 5
    big = np.arange(3 * k * n, dtype=dtype).reshape(3 * k, n) + 1
    w = {
        "rows": big[:k],
        "transposed": np.ascontiguousarray(big[:k].T).T,
        "strided": big[: 3 * k : 3],
    }[layout]
    assert w.shape == (k, n)
    packed_big = np.full(packed_shape(k + 4, n, dtype), np.nan, dtype)
    pack(w, packed_big[:, 2 : 2 + k])
    for p in range(packed_big.shape[0]):
        width = min(nr, n - p * nr)
        np.testing.assert_array_equal(
            packed_big[p, 2 : 2 + k, :width], w[:, p * nr : p * nr + width]
        )
        np.testing.assert_array_equal(packed_big[p, 2 : 2 + k, width:], 0)
    assert np.isnan(packed_big[:, :2]).all() and np.isnan(packed_big[:, 2 + k :]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 31, 32, 33, 64, 69, 71])
@pytest.mark.parametrize("n", [1, 5, 16, 31, 32, 33, 64, 100, 128, 129, 256, 300])
def test_exact_on_small_integers(dtype, m, n):
    """Small integers make every product and partial sum exact: the result must be exact.

    This pins down every output element of every kernel shape and ragged edge, so any
    wrong index, lane, mask or accumulator in the micro-kernel fails here. From 64 rows
    on, blocks of 6 rows take over and leave 4 (64), 3 (69) or 5 (71) rows to the others.
    """
    k = 37
    rng = np.random.default_rng(m * 1000 + n)
    w = rng.integers(-8, 9, size=(k, n)).astype(dtype)
    rows = rng.integers(-8, 9, size=(m, k)).astype(dtype)
    packed = empty_packed(k, n, dtype)
    pack(w, packed)
    out = np.full((m, n + 3), SENTINEL, dtype)
    packed_matmul(rows, packed, out, n, False)
    np.testing.assert_array_equal(out[:, :n], rows @ w)
    np.testing.assert_array_equal(out[:, n:], SENTINEL)
    packed_matmul(rows, packed, out, n, True)
    np.testing.assert_array_equal(out[:, :n], 2 * (rows @ w))
    np.testing.assert_array_equal(out[:, n:], SENTINEL)
    # A bias starts every row's accumulators; only its first n values are read (the
    # masked loads of a ragged block stop at n, so NaN beyond them must not leak in).
    bias = np.concatenate([rng.integers(-8, 9, size=n), np.full(40, np.nan)]).astype(dtype)
    packed_matmul(rows, packed, out, n, False, bias)
    np.testing.assert_array_equal(out[:, :n], rows @ w + bias[:n])
    np.testing.assert_array_equal(out[:, n:], SENTINEL)
    packed_matmul(rows, packed, out, n, True, bias)
    np.testing.assert_array_equal(out[:, :n], 2 * (rows @ w + bias[:n]))
    np.testing.assert_array_equal(out[:, n:], SENTINEL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 12, 64, 69, 71])
@pytest.mark.parametrize("n", [1, 31, 33, 100, 129])
def test_exact_with_transposed_rows_and_sliced_panels(dtype, m, n):
    """The gradient pass's operands: ``rows = δa_block^T`` (stride along K is a row of
    ``δa``, stride between rows one element) and a slice ``packed[:, k0:k1]`` of a buffer
    packed for more rows (panels not adjacent). Exact on small integers, as above."""
    k, k0 = 37, 11
    rng = np.random.default_rng(m * 1000 + n)
    w_big = rng.integers(-8, 9, size=(k0 + k + 5, n)).astype(dtype)
    packed_big = empty_packed(*w_big.shape, dtype)
    pack(w_big, packed_big)
    d_a = rng.integers(-8, 9, size=(k, m + 3)).astype(dtype)
    rows = d_a[:, 1 : 1 + m].T
    assert rows.strides == (d_a.itemsize, d_a.strides[0])
    out = np.full((m, n + 3), SENTINEL, dtype)
    expected = rows @ w_big[k0 : k0 + k]
    packed_matmul(rows, packed_big[:, k0 : k0 + k], out, n, False)
    np.testing.assert_array_equal(out[:, :n], expected)
    np.testing.assert_array_equal(out[:, n:], SENTINEL)
    packed_matmul(rows, packed_big[:, k0 : k0 + k], out, n, True)
    np.testing.assert_array_equal(out[:, :n], 2 * expected)
    np.testing.assert_array_equal(out[:, n:], SENTINEL)


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    m=st.one_of(st.integers(1, 40), st.integers(60, 90)),
    k=st.integers(1, 300),
    n=st.integers(1, 600),
    row_step=st.integers(1, 3),
    offset=st.integers(0, 3),
    accumulate=st.booleans(),
    transposed=st.booleans(),
    k0=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_matches_numpy(dtype, m, k, n, row_step, offset, accumulate, transposed, k0, seed):
    out, expected, bound = run_case(
        dtype,
        m,
        k,
        n,
        row_step=row_step,
        offset=offset,
        accumulate=accumulate,
        transposed=transposed,
        k0=k0,
        seed=seed,
    )
    assert np.all(np.abs(out - expected) <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_shapes_close_to_numpy(dtype):
    """The shapes of the time loop (N = 4K) agree with NumPy to the usual tolerances.

    float32: rtol 1e-5 of the largest element is above the forward error bound of a
    K <= 512 dot product of O(1) values with random signs (about sqrt(K) * eps * |a||b|);
    float64: 1e-12.
    """
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for m, k in [(1, 64), (4, 128), (8, 256), (13, 512)]:
        out, expected, _ = run_case(dtype, m, k, 4 * k, seed=k)
        np.testing.assert_allclose(out, expected, rtol=0, atol=rtol * np.abs(expected).max())


def test_k_zero_writes_zeros_or_keeps():
    rows = np.empty((3, 0), np.float64)
    packed = empty_packed(0, 20, np.float64)
    pack(np.empty((0, 20)), packed)
    out = np.full((3, 21), 2.0)
    packed_matmul(rows, packed, out, 20, True)
    np.testing.assert_array_equal(out, 2.0)
    packed_matmul(rows, packed, out, 20, False)
    np.testing.assert_array_equal(out[:, :20], 0.0)
    assert out[0, 20] == 2.0


def test_shape_errors():
    w = np.ones((4, 40), np.float32)
    packed = empty_packed(4, 40, np.float32)
    pack(w, packed)
    with pytest.raises(ValueError):
        pack(np.ones((5, 40), np.float32), packed)
    with pytest.raises(ValueError):
        packed_matmul(np.ones((2, 5), np.float32), packed, np.zeros((2, 40), np.float32), 40, False)
    with pytest.raises(ValueError):
        packed_matmul(np.ones((2, 4), np.float32), packed, np.zeros((2, 39), np.float32), 40, False)
    with pytest.raises(ValueError):
        packed_matmul(np.ones((2, 4), np.float32), packed, np.zeros((2, 80), np.float32), 80, False)
    with pytest.raises(ValueError, match="panel"):  # a panel's rows not contiguous
        wide = empty_packed(8, 40, np.float32)
        pack(np.ones((8, 40), np.float32), wide)
        packed_matmul(
            np.ones((2, 4), np.float32), wide[:, ::2], np.zeros((2, 40), np.float32), 40, False
        )
    with pytest.raises(ValueError, match="out"):  # out without unit stride along N
        out = np.zeros((2, 80), np.float32)[:, ::2]
        packed_matmul(np.ones((2, 4), np.float32), packed, out, 40, False)
    rows, out = np.ones((2, 4), np.float32), np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="bias"):  # too short
        packed_matmul(rows, packed, out, 40, False, np.ones(39, np.float32))
    with pytest.raises(ValueError, match="bias"):  # not contiguous
        packed_matmul(rows, packed, out, 40, False, np.ones(80, np.float32)[::2])


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    row_offset=st.integers(0, 3),
    column_offset=st.integers(0, 3),
)
@settings(max_examples=40, deadline=None)
def test_transpose_equals_numpy(dtype, m, n, row_offset, column_offset):
    """``transpose`` writes ``src.T`` into the top-left of ``dst`` and nothing else: whole
    tiles of one vector a side (16 float32, 8 float64) and ragged edges, from a slice of a
    larger array (any row stride, any alignment) into a larger ``dst``."""
    rng = np.random.default_rng(m * 41 + n)
    big = rng.standard_normal((m + row_offset + 2, n + column_offset + 5)).astype(dtype)
    src = big[row_offset : row_offset + m, column_offset : column_offset + n]
    dst = np.full((n + 3, m + 7), SENTINEL, dtype)
    transpose(src, dst)
    np.testing.assert_array_equal(dst[:n, :m], src.T)
    assert (dst[n:] == SENTINEL).all() and (dst[:, m:] == SENTINEL).all()


def test_transpose_errors():
    src = np.ones((4, 20), np.float32)
    with pytest.raises(ValueError, match="smaller"):
        transpose(src, np.zeros((19, 4), np.float32))
    with pytest.raises(ValueError, match="smaller"):
        transpose(src, np.zeros((20, 3), np.float32))
    with pytest.raises(ValueError, match="unit stride"):
        transpose(np.ones((4, 40), np.float32)[:, ::2], np.zeros((20, 4), np.float32))
    with pytest.raises(ValueError, match="unit stride"):
        transpose(src, np.zeros((20, 8), np.float32)[:, ::2])


def test_ir_keeps_512_bit_vectors():
    """The kernel is written with 64-byte vectors; on an AVX-512 host they stay in zmm."""
    kernel = numba.njit(packed_matmul.py_func)  # uncached copy, so inspection works
    k, n = 16, 70
    packed = empty_packed(k, n, np.float32)
    pack(np.ones((k, n), np.float32), packed)
    kernel(np.ones((9, k), np.float32), packed, np.zeros((9, n), np.float32), n, False)
    llvm_ir = next(iter(kernel.inspect_llvm().values()))
    assert "llvm.fmuladd.v16f32" in llvm_ir
    assert "llvm.masked.store.v16f32" in llvm_ir
    assert '"prefer-vector-width"="512"' in llvm_ir
    assert "llvm.prefetch" in llvm_ir  # W's panels are fetched ahead of their loads
    if llvm.get_host_cpu_features().get("avx512f", False):
        asm = next(iter(kernel.inspect_asm().values()))
        assert "vfmadd231ps\t%zmm" in asm or "vfmadd231ps %zmm" in asm


def test_cache_reload_in_new_process(tmp_path):
    """Compiled code is cached on disk and a second process loads it and agrees."""
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        from numlstm.backends._packed import empty_packed, pack, packed_matmul
        rng = np.random.default_rng(1)
        w = rng.standard_normal((70, 90)).astype(np.float32)
        rows = rng.standard_normal((11, 70)).astype(np.float32)
        packed = empty_packed(70, 90, np.float32)
        pack(w, packed)
        out = np.zeros((11, 90), np.float32)
        packed_matmul(rows, packed, out, 90, False)
        stats = packed_matmul.stats
        print(json.dumps({"hits": sum(stats.cache_hits.values()),
                          "misses": sum(stats.cache_misses.values()),
                          "out": out.tobytes().hex()}))
        """
    )
    runs = [run for run, _ in run_twice_in_new_processes(script, tmp_path)]
    assert runs[0]["misses"] >= 1 and runs[0]["hits"] == 0
    assert runs[1]["hits"] >= 1 and runs[1]["misses"] == 0
    assert runs[0]["out"] == runs[1]["out"]
