"""The CPU backend's buffer pool: a buffer is handed out again only once nothing refers to
it, the pool stays within its bytes, and training reuses its buffers without changing a
result or any array the caller holds."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
from numba import njit

import numlstm
from numlstm.backends import _buffers, cpu
from numlstm.backends._packed import aligned_empty


def test_a_buffer_is_handed_out_again_once_nothing_refers_to_it():
    pool = _buffers.BufferPool(1 << 20)
    first = pool.take(1000)
    first_address = first.ctypes.data
    second = pool.take(1000)
    assert second.ctypes.data != first_address  # the first is in use
    del first
    third = pool.take(1000)
    assert third.ctypes.data == first_address
    assert pool.held() == 2000


@njit
def _numba_view(array):
    return array[2:]


@pytest.mark.parametrize(
    "make_view",
    [
        lambda raw: np.ndarray((10,), np.float32, raw, 24),
        lambda raw: np.ndarray((10,), np.float32, raw, 24)[3:7],
        lambda raw: np.ndarray((2, 5), np.float32, raw, 0).T[1:],
        lambda raw: np.lib.stride_tricks.as_strided(raw, (10, 10), (8, 1)),
        lambda raw: raw[104:].view(np.float64),
        lambda raw: _numba_view(np.ndarray((10,), np.float32, raw, 0)),
        lambda raw: memoryview(raw),
    ],
    ids=["ndarray", "slice", "transposed", "strided", "dtype-view", "numba-view", "memoryview"],
)
def test_every_kind_of_view_keeps_a_buffer_in_use(make_view):
    pool = _buffers.BufferPool(1 << 20)
    raw = pool.take(1000)
    address = raw.ctypes.data
    view = make_view(raw)
    del raw
    assert pool.idle() == 0
    other = pool.take(1000)
    assert other.ctypes.data != address
    del view
    assert pool.idle() == 1000
    assert pool.take(1000).ctypes.data == address


def test_nothing_but_the_pool_counts_as_idle():
    # The count of references that means "idle" is measured when the module loads.
    pool = _buffers.BufferPool(1 << 20)
    pool.take(64)
    assert pool.idle() == 64
    kept = pool.take(64)  # the same one, now in use
    assert pool.idle() == 0 and pool.held() == 64
    del kept
    assert pool.idle() == 64


def test_a_larger_idle_buffer_serves_requests_down_to_three_quarters_of_it():
    pool = _buffers.BufferPool(1 << 20)
    address = pool.take(1000).ctypes.data
    assert pool.take(750).ctypes.data == address
    assert pool.take(749).ctypes.data != address
    assert pool.take(1001).ctypes.data != address
    # Of two idle buffers that fit, the smaller one serves.
    pool = _buffers.BufferPool(1 << 20)
    large, small = pool.take(1200), pool.take(1000)
    small_address = small.ctypes.data
    del large, small
    assert pool.take(950).ctypes.data == small_address


def test_the_pool_holds_at_most_max_bytes_and_drops_the_least_recently_taken_first():
    pool = _buffers.BufferPool(3000)
    a, b, c = pool.take(1000), pool.take(1000), pool.take(1000)
    b_address = b.ctypes.data
    assert pool.held() == 3000
    beyond = pool.take(1000)  # nothing idle to drop: handed out, not kept
    assert beyond.nbytes == 1000 and pool.held() == 3000
    del beyond
    assert pool.idle() == 0
    del a, b
    # A size that no idle buffer serves needs room: a (taken first) goes, b stays.
    small = pool.take(500)
    assert pool.held() == 2500
    assert pool.take(1000).ctypes.data == b_address
    del c, small


def test_the_pool_holds_at_most_max_buffers():
    pool = _buffers.BufferPool(1 << 20, max_buffers=3)
    kept = [pool.take(100) for _ in range(5)]  # a caller keeping every output
    assert pool.held() == 300 and all(b.nbytes == 100 for b in kept)
    first, second = kept[0].ctypes.data, kept[1].ctypes.data
    del kept[:2]  # two of the tracked ones go idle
    small = pool.take(50)  # no idle one serves 50 bytes: the least recently taken goes
    assert pool.held() == 250
    again = pool.take(100)
    assert again.ctypes.data == second and again.ctypes.data != first
    assert pool.idle() == 0
    del small, again


def test_release_drops_idle_buffers_only():
    pool = _buffers.BufferPool(1 << 20)
    kept = pool.take(500)
    pool.take(700)
    assert pool.idle() == 700
    pool.release()
    assert pool.idle() == 0 and pool.held() == 500
    kept[:] = 7  # still ours
    assert pool.take(500).ctypes.data != kept.ctypes.data


def test_a_pool_of_no_bytes_keeps_nothing():
    pool = _buffers.BufferPool(0)
    assert pool.take(1000).nbytes == 1000
    assert pool.held() == 0 and pool.idle() == 0


def test_requests_below_min_bytes_bypass_the_pool():
    pool = _buffers.BufferPool(1 << 20, min_bytes=512)
    small = pool.take(511)
    assert small.nbytes == 511 and pool.held() == 0
    del small
    assert pool.take(511).nbytes == 511 and pool.held() == 0
    assert pool.take(512).nbytes == 512 and pool.held() == 512


def test_threads_never_hold_one_buffer_at_once():
    pool = _buffers.BufferPool(1 << 16)
    errors = []
    barrier = threading.Barrier(4)

    def work(tag):
        try:
            barrier.wait(10)
            for _ in range(2000):
                buffer = pool.take(256)
                buffer[:] = tag
                if not (buffer == tag).all():  # another thread wrote into it
                    errors.append(tag)
                del buffer
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(tag,)) for tag in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert pool.held() <= 4 * 256


def test_a_forked_child_takes_buffers_though_the_parent_held_the_lock():
    with _buffers.pool._lock:  # as another thread of the parent could, when it forks
        pid = os.fork()
        if pid == 0:  # the child: without a new lock, take would wait for good
            signal.alarm(20)
            os._exit(0 if _buffers.pool.take(64).nbytes == 64 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_aligned_arrays_start_on_a_cache_line_on_reused_buffers():
    for _ in range(3):
        for shape in [(3, 5), (7,), (2, 3, 33)]:
            array = aligned_empty(shape, np.float32)
            assert array.ctypes.data % 64 == 0 and array.shape == shape
            assert array.flags.c_contiguous and array.flags.writeable


def _train(model, xs, d_outs):
    results = []
    for x, d_out in zip(xs, d_outs, strict=True):
        output, (h_n, c_n) = model(x)
        d_x, (d_h0, d_c0) = model.backward(d_out)
        with numlstm.no_grad():
            inferred = model(x)[0]
        results.append((output, h_n, c_n, d_x, d_h0, d_c0, inferred))
    return results


CONFIGS = {"one-layer": dict(), "two-layer-bidirectional": dict(num_layers=2, bidirectional=True)}


def _batches(config, count):
    rng = np.random.default_rng(3)
    # Large enough for the pool (POOL_MIN_BYTES): the gates take 200 * 8 * 128 * 4 = 800 KB.
    steps, batch, n_in, hidden = 200, 8, 6, 32
    width = hidden * (2 if config.get("bidirectional") else 1)
    xs = [rng.standard_normal((steps, batch, n_in)).astype(np.float32) for _ in range(count)]
    d_outs = [rng.standard_normal((steps, batch, width)).astype(np.float32) for _ in range(count)]
    return numlstm.LSTM(n_in, hidden, seed=0, **config), xs, d_outs


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_training_loop_takes_the_buffers_of_its_earlier_steps(config):
    model, xs, d_outs = _batches(config, 5)
    cpu.release_memory()
    held = []
    for x, d_out in zip(xs, d_outs, strict=True):
        model(x)
        model.backward(d_out)
        held.append(cpu.buffer_pool.held())
    # The second step's outputs are new while the caller holds the first's (until the
    # loop's assignment); from then on, each step takes the buffers of the ones before.
    assert held[0] > 0 and held[2] == held[3] == held[4], held


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_arrays_the_caller_keeps_are_never_handed_out_again(config, monkeypatch):
    model, xs, d_outs = _batches(config, 4)
    cpu.release_memory()
    kept = _train(model, xs, d_outs)
    # Every array the caller kept holds what it held when it was returned: the same as
    # from a model whose every buffer is new.
    monkeypatch.setattr(cpu.buffer_pool, "max_bytes", 0)
    cpu.release_memory()
    fresh_model, _, _ = _batches(config, 0)
    fresh = _train(fresh_model, xs, d_outs)
    for got, expected in zip(kept, fresh, strict=True):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
