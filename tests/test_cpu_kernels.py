"""The CPU backend's per-step product inside whole models, at shapes the small models of the
other tests do not reach.

The time loops multiply by ``W_hh`` with the packed micro-kernels of
:mod:`numlstm.backends._packed` (tested alone in ``test_packed.py``). Here the shapes make
every kind of block appear inside a real forward and backward pass: hidden sizes whose
``4H`` (forward) and ``H`` (backward) leave a ragged last panel, several panels per group,
and batches that leave remainder rows after the 8-row blocks on each thread.
"""

from __future__ import annotations

import textwrap
import threading
import time
from unittest import mock

import numba
import numpy as np
import pytest
from conftest import assert_close, run_twice_in_new_processes

import numlstm
from numlstm.backends import cpu


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("hidden", "batch"),
    [(100, 13), (37, 1), (256, 5), (20, 33), (256, 40)],
    ids=["ragged-panels", "one-row", "wide", "many-rows", "wide-many-rows"],
)
def test_a_model_matches_torch_at_every_block_shape(hidden, batch, dtype):
    torch = pytest.importorskip("torch")
    ours = numlstm.LSTM(3, hidden, bidirectional=True, dtype=dtype, seed=0)
    torch_dtype = getattr(torch, dtype)
    theirs = torch.nn.LSTM(3, hidden, bidirectional=True, dtype=torch_dtype)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal((4, batch, 3)).astype(dtype)
    d_output = rng.standard_normal((4, batch, 2 * hidden)).astype(dtype)

    output, (h_n, c_n) = ours(x)
    d_x, _ = ours.backward(d_output)

    x_torch = torch.from_numpy(x).requires_grad_(True)
    output_torch, (h_torch, c_torch) = theirs(x_torch)
    output_torch.backward(torch.from_numpy(d_output))
    assert_close(output, output_torch.detach().numpy(), dtype=dtype)
    assert_close(h_n, h_torch.detach().numpy(), dtype=dtype)
    assert_close(c_n, c_torch.detach().numpy(), dtype=dtype)
    assert_close(d_x, x_torch.grad.numpy(), dtype=dtype)
    for name, parameter in theirs.named_parameters():
        assert_close(ours.grads[name], parameter.grad.numpy(), name=name, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(("panels", "short"), [(38, 0), (37, 5)])
def test_recurrent_product_sweeps_large_weights_both_ways(dtype, accumulate, panels, short):
    """Above ``REVERSED_SWEEP_MIN_BYTES`` the step's product goes by groups of panels, in
    reverse order at odd steps; every column is still one ``k`` loop of the micro-kernel,
    so both orders give exactly one call's result (here with a ragged last group and a
    ragged last panel)."""
    from numlstm.backends._packed import empty_packed, pack, packed_matmul, panel_width

    k = 1024  # 128 KB a panel: 37-38 panels take 4.6-4.8 MB
    n = panels * panel_width(dtype) - short
    rng = np.random.default_rng(panels)
    w = rng.standard_normal((k, n)).astype(dtype)
    packed = empty_packed(k, n, dtype)
    pack(w, packed)
    assert packed.nbytes > cpu.REVERSED_SWEEP_MIN_BYTES and packed.shape[0] % 4 != 0
    rows = rng.standard_normal((5, k)).astype(dtype)
    start = rng.standard_normal((5, n + 3)).astype(dtype)
    expected = start.copy()
    packed_matmul(rows, packed, expected, n, accumulate)
    for t in (0, 1):
        out = start.copy()
        cpu._recurrent_product(rows, packed, out, n, accumulate, t)
        np.testing.assert_array_equal(out, expected)


def _run(dtype, lengths=(6, 2, 5)):
    """A bidirectional two-layer model over unsorted padded sequences (one per length) with
    initial states: output, final states and every gradient, and inference."""
    model = numlstm.LSTM(4, 11, num_layers=2, bidirectional=True, dtype=dtype, seed=1)
    rng = np.random.default_rng(1)
    batch = len(lengths)
    x = rng.standard_normal((6, batch, 4)).astype(dtype)
    h0 = rng.standard_normal((4, batch, 11)).astype(dtype)
    c0 = rng.standard_normal((4, batch, 11)).astype(dtype)
    lengths = np.array(lengths)
    output, (h_n, c_n) = model(x, (h0, c0), lengths=lengths)
    d_x, (d_h0, d_c0) = model.backward(rng.standard_normal(output.shape).astype(dtype))
    results = {
        "output": output,
        "h_n": h_n,
        "c_n": c_n,
        "d_x": d_x,
        "d_h0": d_h0,
        "d_c0": d_c0,
        **model.grads,
    }
    # Inference keeps no tape, and with every sequence at full length writes each h_t
    # straight into the output: both ways.
    with numlstm.no_grad():
        for name, step_lengths in (("padded", lengths), ("full", None)):
            output, (h_n, c_n) = model(x, (h0, c0), lengths=step_lengths)
            results[f"{name} inference output"] = output
            results[f"{name} inference h_n"] = h_n
            results[f"{name} inference c_n"] = c_n
    return results


def _assert_same_results(actual, expected, dtype):
    """Every result of :func:`_run` agrees: the same products, summed in another order or
    blocking (float64 to 1e-12 of the largest magnitude, float32 to the usual tolerance)."""
    for name, value in expected.items():
        assert_close(
            actual[name], value, rtol=1e-12 if dtype == "float64" else None, dtype=dtype, name=name
        )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("blocks", [2, 3])
def test_steps_split_by_hidden_units_equal_steps_split_by_sequences(monkeypatch, blocks, dtype):
    """Few sequences against large weights split each step by units (``UNIT_SPLIT_*``);
    forced here onto a small model, with uneven blocks of units, it must give what the
    split by sequences gives: the same products, only shared out differently."""
    for name in ("UNIT_SPLIT_MAX_ROWS", "UNIT_SPLIT_MAX_ROWS_FORWARD", "UNIT_SPLIT_FEW_ROWS"):
        monkeypatch.setattr(cpu, name, 0)
    by_sequences = _run(dtype)

    for name in ("UNIT_SPLIT_MAX_ROWS", "UNIT_SPLIT_MAX_ROWS_FORWARD"):
        monkeypatch.setattr(cpu, name, 1 << 30)
    monkeypatch.setattr(cpu, "UNIT_SPLIT_MIN_BYTES", 0)
    monkeypatch.setattr(cpu, "get_num_threads", lambda: blocks)
    packed = []
    for name in ("_unit_blocks_forward", "_unit_blocks_backward"):
        original = getattr(cpu, name)
        monkeypatch.setattr(
            cpu, name, lambda w, k, original=original: packed.append(k) or original(w, k)
        )
    by_units = _run(dtype)

    # 2 layers x 2 directions, for 3 forward passes (training, 2 inference) and 1 backward.
    assert packed.count(blocks) == 4 * 2 * 2
    _assert_same_results(by_units, by_sequences, dtype)


def test_few_sequences_split_the_forward_pass_by_units_from_1_mb():
    """The forward pass splits by units with one sequence a thread from 1 MB of ``W_hh``
    (float32 H = 256), and otherwise from 2 MB with fewer than 13 rows a thread; the
    backward pass only from 2 MB with fewer than 8 (two threads here)."""

    def forward(batch, hidden):
        return cpu._split_by_units(
            batch,
            hidden,
            16 * hidden * hidden,  # float32 W_hh, 4H x H
            2,
            cpu.UNIT_SPLIT_MAX_ROWS_FORWARD,
            cpu.UNIT_SPLIT_FEW_ROWS,
        )

    def backward(batch, hidden):
        return cpu._split_by_units(batch, hidden, 16 * hidden * hidden, 2, cpu.UNIT_SPLIT_MAX_ROWS)

    assert forward(1, 256) and forward(2, 256)
    assert not forward(3, 256) and not forward(8, 256)
    assert not forward(1, 192)  # 576 KB
    assert forward(24, 384) and not forward(26, 384)  # 2.25 MB: 12 and 13 rows a thread
    assert not backward(1, 256)
    assert backward(14, 384) and not backward(16, 384)


def test_limit_threads_lowers_the_calling_threads_count_only():
    """The kernels run a parallel region with fewer iterations than threads (one sequence's
    time loop, a short projection) on as many threads as it has work for."""
    before = numba.get_num_threads()
    try:
        assert cpu._limit_threads(1) == before
        assert numba.get_num_threads() == 1
        assert cpu._limit_threads(before + 5) == 1  # never above the count it finds
        assert numba.get_num_threads() == 1
        assert cpu._limit_threads(0) == 1  # at least one
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


def test_a_kernel_error_gives_the_caller_its_thread_count_back():
    """If a time-loop kernel raises after it lowered its regions' thread count, the layer
    entry point puts the caller's count back."""
    before = numba.get_num_threads()
    with pytest.raises(RuntimeError, match="the kernel failed"):
        with cpu._ThreadsKept(before):
            cpu._limit_threads(1)
            raise RuntimeError("the kernel failed")
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("batch", [1, 3])
def test_a_pass_leaves_the_callers_thread_count_as_it_found_it(batch):
    model = numlstm.LSTM(4, 6, bidirectional=True, seed=0)
    x = np.ones((5, batch, 4), np.float32)
    before = numba.get_num_threads()
    output, _ = model(x)
    model.backward(np.ones_like(output))
    with numlstm.no_grad():
        model(x)
    assert numba.get_num_threads() == before


def test_time_loops_load_from_the_cache_in_a_new_process(tmp_path):
    """The time loops, which set the thread count of their regions, stay cacheable: a
    second process loads them from the cache and agrees with the first."""
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        import numlstm
        from numlstm.backends import cpu
        model = numlstm.LSTM(3, 5, seed=0)
        x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 1, 3)
        output, _ = model(x)
        d_x, _ = model.backward(np.ones_like(output))
        kernels = (cpu.forward_kernel, cpu.backward_kernel)
        print(json.dumps({
            "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
            "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
            "out": output.tobytes().hex() + d_x.tobytes().hex(),
        }))
        """
    )
    runs = []
    for run, stderr in run_twice_in_new_processes(script, tmp_path):
        assert "Cannot cache" not in stderr
        runs.append(run)
    assert runs[0]["misses"] == 2 and runs[0]["hits"] == 0
    assert runs[1]["hits"] == 2 and runs[1]["misses"] == 0
    assert runs[0]["out"] == runs[1]["out"]


def _record_layer_calls(monkeypatch):
    """Record each call of the CPU backend's layer entry points: its direction (reverse or
    not), the thread that ran it and Numba's thread count in that thread."""
    calls = []

    def recorded(original, reverse_of):
        def call(*args, **kwargs):
            calls.append((reverse_of(args), threading.get_ident(), numba.get_num_threads()))
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(cpu, "layer_forward", recorded(cpu.layer_forward, lambda a: a[9]))
    monkeypatch.setattr(cpu, "layer_backward", recorded(cpu.layer_backward, lambda a: a[0].reverse))
    return calls


def _concurrent():
    """Whether this machine runs a layer's directions at once for one sequence."""
    return numba.get_num_threads() >= 2 and cpu.threading_layer() in cpu.CONCURRENT_LAYERS


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_directions_of_one_sequence_run_at_once(monkeypatch, dtype):
    """With fewer sequences than threads, a layer's two directions run at once, the reverse
    one in the worker thread, each on half of the threads (forced here onto a small model,
    padded, with initial states), and give what they give one after the other."""

    monkeypatch.setattr(cpu, "CONCURRENT_DIRECTIONS_MIN_FLOPS", 1 << 62)
    one_after_the_other = _run(dtype, lengths=(4,))
    monkeypatch.setattr(cpu, "CONCURRENT_DIRECTIONS_MIN_FLOPS", 0)
    calls = _record_layer_calls(monkeypatch)
    at_once = _run(dtype, lengths=(4,))
    _assert_same_results(at_once, one_after_the_other, dtype)

    # 2 layers x 2 directions, in the training forward pass, backward and two inferences.
    assert len(calls) == 16
    threads = numba.get_num_threads()
    main = threading.get_ident()
    forward_direction = {(thread, count) for reverse, thread, count in calls if not reverse}
    reverse_direction = {(thread, count) for reverse, thread, count in calls if reverse}
    if _concurrent():
        assert forward_direction == {(main, threads // 2)}
        assert len(reverse_direction) == 1
        worker, count = reverse_direction.pop()
        assert worker != main and count == threads - threads // 2
    else:
        assert forward_direction == reverse_direction == {(main, threads)}


def test_run_directions_returns_in_order_and_passes_errors_on(monkeypatch):
    """The results come back in the jobs' order; an error in either direction reaches the
    caller, and one in the first only after the second has ended (at once or not)."""
    monkeypatch.setattr(cpu, "CONCURRENT_DIRECTIONS_MIN_FLOPS", 0)
    assert cpu.run_directions([lambda: "forward", lambda: "reverse"], 1, 0, 0) == [
        "forward",
        "reverse",
    ]

    ended = threading.Event()

    def first():
        raise ValueError("the first direction failed")

    def second():
        time.sleep(0.05)
        ended.set()
        return "reverse"

    with pytest.raises(ValueError, match="the first direction failed"):
        cpu.run_directions([first, second], 1, 0, 0)
    assert ended.is_set() == _concurrent()  # one after the other, the second never starts

    def failing_second():
        raise KeyError("the second direction failed")

    with pytest.raises(KeyError, match="the second direction failed"):
        cpu.run_directions([lambda: "forward", failing_second], 1, 0, 0)


@pytest.mark.parametrize(
    ("batch", "loop_flops", "weight_bytes", "layer"),
    [
        (2, 1 << 30, 0, None),
        (1, (1 << 24) - 1, 0, None),
        (1, 1 << 30, 1 << 21, None),
        (1, 1 << 30, 0, "workqueue"),
    ],
    ids=["as-many-sequences-as-threads", "little-work", "large-weights", "workqueue-layer"],
)
def test_run_directions_runs_them_in_turn(monkeypatch, batch, loop_flops, weight_bytes, layer):
    """One after the other in the calling thread, each on all threads: when every thread
    has a sequence of its own (two threads here), when the time loops have too little work
    to pay for the hand-over, when ``W_hh`` is too large for one core's cache (each step is
    then shared by units between the threads), and under Numba's workqueue threading layer,
    which cannot start parallel regions from two threads at once."""
    monkeypatch.setattr(cpu, "get_num_threads", lambda: 2)
    if layer is not None:
        monkeypatch.setattr(cpu, "threading_layer", lambda: layer)
    ran = []

    def job():
        ran.append((threading.get_ident(), numba.get_num_threads()))
        return len(ran)

    assert cpu.run_directions([job, job], batch, loop_flops, weight_bytes) == [1, 2]
    assert ran == [(threading.get_ident(), numba.get_num_threads())] * 2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("block_rows", "threads"), [(4, 2), (128, 2), (4, 3), (4, 5)])
def test_gradient_gemms_by_gate_rows_equal_by_rows(monkeypatch, block_rows, threads, dtype):
    """The gradient GEMMs after the backward time loop split the weight gradients over
    threads by gate rows for layers with large weights (``_gradient_gemms``) and by rows of
    ``δa`` into partial sums for small ones (``_gradient_gemms_packed``;
    ``PACKED_GRADIENT_MAX_BYTES`` decides). Forced both ways on the same model, they must
    agree: with blocks of 4 rows (a ragged last block on every thread), and with 2, 3 and 5
    threads over the model's 44 gate rows (split in multiples of 16: ragged shares, and
    threads with none)."""
    chosen = []

    def spy(*args, original=cpu._packed_gradients):
        chosen.append(original(*args))
        return chosen[-1]

    monkeypatch.setattr(cpu, "_packed_gradients", spy)
    monkeypatch.setattr(cpu, "get_num_threads", lambda: threads)
    monkeypatch.setattr(cpu, "GRADIENT_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(cpu, "PACKED_GRADIENT_MAX_BYTES", 0)
    by_gate_rows = _run(dtype)
    assert chosen == [False] * 4  # 2 layers x 2 directions
    monkeypatch.setattr(cpu, "PACKED_GRADIENT_MAX_BYTES", 1 << 40)
    by_rows = _run(dtype)
    assert chosen[4:] == [True] * 4
    _assert_same_results(by_gate_rows, by_rows, dtype)


@pytest.mark.parametrize("packed_gradients", [True, False], ids=["by_rows", "by_gate_rows"])
def test_transposed_d_a_gives_the_same_bits(monkeypatch, packed_gradients):
    """Whether the gradient GEMMs read ``δa^T`` from a transposed copy of each block or in
    place (``TRANSPOSE_MIN_ROW_BYTES``) changes where the products load their left factor,
    not what they add up: the whole model's results are the same bits both ways."""
    monkeypatch.setattr(cpu, "PACKED_GRADIENT_MAX_BYTES", 1 << 40 if packed_gradients else 0)
    results = []
    for min_row_bytes in (0, 1 << 40):
        monkeypatch.setattr(cpu, "TRANSPOSE_MIN_ROW_BYTES", min_row_bytes)
        results.append(_run("float32"))
    for name, value in results[0].items():
        np.testing.assert_array_equal(results[1][name], value, err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threads", [1, 2, 3, 40])
@pytest.mark.parametrize("way", ["_gradient_gemms", "_gradient_gemms_packed"])
@pytest.mark.parametrize("transposed", [True, False], ids=["d_a_t", "in_place"])
def test_gradient_gemms_equal_numpy(monkeypatch, transposed, way, threads, dtype):
    """Both ways of the gradient GEMMs against NumPy's products, at a shape with full and
    ragged panels (I = 37, P = 100) and 400 gate rows: shared over 1 to 3 threads, or over
    more threads than the 25 blocks of 16 gate rows (some get none), with the outputs
    poisoned with NaN first; reading each block of ``δa^T`` from a transposed copy and in
    place. The copy's tiles are ragged along the rows (301 in all, in blocks of 128: the
    last block of each thread's rows is partial); the gate rows, 400 and the threads' shares
    in multiples of 16, fill whole tiles (``test_transpose_equals_numpy`` in
    ``test_packed.py`` covers ragged tiles both ways)."""
    from numlstm.backends._packed import empty_packed, pack

    monkeypatch.setattr(cpu, "TRANSPOSE_MIN_ROW_BYTES", 0 if transposed else 1 << 40)

    rng = np.random.default_rng(threads)
    rows, n_inputs, hidden = 301, 37, 100
    d_a = rng.standard_normal((rows, 4 * hidden)).astype(dtype)
    inputs = rng.standard_normal((rows, n_inputs)).astype(dtype)
    h_prev = rng.standard_normal((rows, hidden)).astype(dtype)
    w_ih = rng.standard_normal((4 * hidden, n_inputs)).astype(dtype)
    w_ih_packed = empty_packed(*w_ih.shape, dtype)
    pack(w_ih, w_ih_packed)
    work = cpu.gradient_work(threads, n_inputs, hidden, hidden, dtype)
    assert work[1].shape[1] == (4 * hidden if transposed else 0)
    d_x = np.full((rows, n_inputs), np.nan, dtype)
    d_w_ih = np.full(w_ih.shape, np.nan, dtype)
    d_w_hh = np.full((4 * hidden, hidden), np.nan, dtype)
    d_bias = np.full(4 * hidden, np.nan, dtype)
    getattr(cpu, way)(d_a, inputs, h_prev, w_ih_packed, d_x, d_w_ih, d_w_hh, d_bias, *work, threads)
    d_a64 = d_a.astype(np.float64)
    assert_close(d_x, d_a64 @ w_ih, dtype=dtype, name="d_x")
    assert_close(d_w_ih, d_a64.T @ inputs, dtype=dtype, name="d_w_ih")
    assert_close(d_w_hh, d_a64.T @ h_prev, dtype=dtype, name="d_w_hh")
    assert_close(d_bias, d_a64.sum(axis=0), dtype=dtype, name="d_bias")


def test_weight_gradients_by_gate_rows_do_not_depend_on_the_threads(monkeypatch):
    """Split by gate rows, each weight gradient is summed over all rows in the same order
    whatever the number of threads: bit for bit the same results with 1, 2 and 3."""
    monkeypatch.setattr(cpu, "PACKED_GRADIENT_MAX_BYTES", 0)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu, "get_num_threads", lambda threads=threads: threads)
        results.append(_run("float32"))
    for name in ("weight_ih_l0", "weight_hh_l0_reverse", "bias_ih_l1", "weight_hh_l1"):
        for other in results[1:]:
            np.testing.assert_array_equal(other[name], results[0][name], err_msg=name)


def test_buffers_start_on_a_cache_line():
    """The CPU's buffers are 64-byte aligned (NumPy starts a large array 16 bytes past a
    page, which splits every 64-byte load of a row over two cache lines)."""
    rng = np.random.default_rng(0)
    steps, batch, n_inputs, hidden = 300, 16, 8, 64  # the tape is far beyond mmap's threshold
    x = rng.standard_normal((steps, batch, n_inputs))
    w_ih = rng.standard_normal((4 * hidden, n_inputs))
    w_hh = rng.standard_normal((4 * hidden, hidden))
    zeros = np.zeros((batch, hidden))
    lengths = np.full(batch, steps)
    y, _, _, tape = cpu.layer_forward(
        x, w_ih, w_hh, None, None, None, zeros, zeros, lengths, False, True
    )
    grads = cpu.layer_backward(tape, np.ones_like(y), zeros, zeros)
    for name, array in [
        ("y", y),
        ("gates", tape.gates),
        ("c_seq", tape.c_seq),
        ("h_seq", tape.h_seq),
        ("d_x", grads.d_x),
        ("unit blocks", cpu._unit_blocks_forward(w_hh, 2)),
    ]:
        assert array.ctypes.data % 64 == 0, name


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stacked_weights_equal_a_projection_pass(monkeypatch, dtype):
    """Small layers multiply ``[x_t, h_{t-1}]`` by the stacked ``[W_ih^T; W_hh^T]`` at each
    step (``STACKED_WEIGHTS_MAX_BYTES``) instead of running a projection pass first; forced
    both ways on the same model, training and inference must agree."""
    monkeypatch.setattr(cpu, "STACKED_WEIGHTS_MAX_BYTES", 0)
    with_pass = _run(dtype)
    monkeypatch.setattr(cpu, "STACKED_WEIGHTS_MAX_BYTES", 1 << 40)
    packed_shapes = []
    original = cpu.empty_packed
    monkeypatch.setattr(
        cpu, "empty_packed", lambda *shape: packed_shapes.append(shape) or original(*shape)
    )
    stacked = _run(dtype)
    # 2 layers x 2 directions pack [W_ih^T; W_hh^T] (inputs 4, then 22) in the training
    # pass and in the first inference pass (the second reuses those, PACKED_CACHE_ENTRIES),
    # and nothing packs W_ih^T or W_hh^T (4 or 11 rows) alone for a forward pass.
    forward_packs = sorted(shape[:2] for shape in packed_shapes if shape[1] == 4 * 11)
    assert forward_packs == [(4 + 11, 44)] * 4 + [(22 + 11, 44)] * 4
    _assert_same_results(stacked, with_pass, dtype)


def _inference_chunks(model, x, lengths=None):
    """The inference pass of ``model``, and the gate chunks its layers allocated."""
    chunks = []
    original = cpu._layout.allocate

    def allocate(*args, **options):
        chunks.append(options["chunk"])
        return original(*args, **options)

    with mock.patch.object(cpu._layout, "allocate", allocate), numlstm.no_grad():
        output, (h_n, c_n) = model(x, lengths=lengths)
    return (output, h_n, c_n), chunks


def test_inference_chunk_shrinks_to_the_gate_byte_budget(monkeypatch):
    """A large batch gets fewer steps per inference chunk (``INFERENCE_GATE_BYTES``), so
    that the gate buffer stays under glibc's threshold for fresh mappings; the results do
    not change. (With weights too large to stack: the projection pass fills the chunks.)"""
    model = numlstm.LSTM(3, 8, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((9, 5, 3))
    monkeypatch.setattr(cpu, "STACKED_WEIGHTS_MAX_BYTES", 0)
    expected, chunks = _inference_chunks(model, x)
    assert chunks == [cpu.INFERENCE_CHUNK]
    step_bytes = 5 * 4 * 8 * 8
    monkeypatch.setattr(cpu, "INFERENCE_GATE_BYTES", 2 * step_bytes + step_bytes // 2)
    results, chunks = _inference_chunks(model, x)
    assert chunks == [2]
    for result, value in zip(results, expected, strict=True):
        np.testing.assert_array_equal(result, value)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "lengths"])
def test_stacked_inference_keeps_one_step_of_gates(padded):
    """With stacked weights, inference allocates one step of gate rows, which every step
    reuses, in both directions; the results are bit for bit those of a buffer of every
    step (the same products and gate math, only the rows they use differ)."""
    model = numlstm.LSTM(3, 8, bidirectional=True, dtype="float64", seed=0)
    batch = 2 * numba.get_num_threads() + 1  # stacked: every thread has sequences
    x = np.random.default_rng(0).standard_normal((9, batch, 3))
    lengths = [(9, 3, 1, 6)[b % 4] for b in range(batch)] if padded else None
    results, chunks = _inference_chunks(model, x, lengths)
    assert chunks == [cpu.INFERENCE_STACKED_CHUNK] * 2 == [1, 1]
    with mock.patch.object(cpu, "INFERENCE_STACKED_CHUNK", 9):
        expected, chunks = _inference_chunks(model, x, lengths)
    assert chunks == [9, 9]
    for result, value in zip(results, expected, strict=True):
        np.testing.assert_array_equal(result, value)


def _key(model):
    """The key of a one-layer model's first layer in the cache of packed weights."""
    weights = dict(model.named_parameters())
    return id(weights["weight_ih_l0"]), id(weights["weight_hh_l0"])


def _infer(model, x):
    with numlstm.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_inference_repacks_weights_changed_in_place(dtype):
    """Inference reuses the packed weights of an earlier call only while the arrays hold
    the same bits: an update in place (an optimiser's step), even of one value, or of 0.0 to
    -0.0, gives the result of a fresh model with those weights."""
    rng = np.random.default_rng(3)
    model = numlstm.LSTM(5, 16, num_layers=2, dtype=dtype, seed=0)
    x = rng.standard_normal((6, 4, 5)).astype(dtype)
    first = _infer(model, x)
    np.testing.assert_array_equal(_infer(model, x), first)  # from the cache
    assert _key(model) in cpu._packed_cache

    def fresh():
        other = numlstm.LSTM(5, 16, num_layers=2, dtype=dtype, seed=1)
        other.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
        return _infer(other, x)

    weights = dict(model.named_parameters())
    weights["weight_hh_l1"][7, 3] += 0.5
    np.testing.assert_array_equal(_infer(model, x), fresh())
    weights["weight_ih_l0"] *= 0.5
    changed = _infer(model, x)
    assert not np.array_equal(changed, first)
    np.testing.assert_array_equal(changed, fresh())
    weights["weight_hh_l0"][0, 0] = 0.0
    _infer(model, x)
    weights["weight_hh_l0"][0, 0] = -0.0
    cached = cpu._packed_cache[_key(model)]
    _infer(model, x)
    assert cpu._packed_cache[_key(model)] is not cached
    np.testing.assert_array_equal(_infer(model, x), fresh())


def test_packed_weight_cache_is_bounded_and_forgets_dropped_weights():
    import gc

    x = np.zeros((2, 4, 3), np.float32)
    models = [numlstm.LSTM(3, 8, seed=k) for k in range(cpu.PACKED_CACHE_ENTRIES + 3)]
    for model in models:
        _infer(model, x)
    assert len(cpu._packed_cache) <= cpu.PACKED_CACHE_ENTRIES
    # The most recent are kept; a reused one moves to the end.
    _infer(models[-cpu.PACKED_CACHE_ENTRIES], x)
    _infer(models[0], x)
    keys = [_key(m) for m in models]
    assert keys[-cpu.PACKED_CACHE_ENTRIES] in cpu._packed_cache
    assert list(cpu._packed_cache)[-1] == keys[0]
    del models, model
    gc.collect()
    assert not any(key in cpu._packed_cache for key in keys)


def test_packed_weight_cache_can_be_turned_off(monkeypatch):
    model = numlstm.LSTM(3, 8, seed=0)
    x = np.ones((2, 4, 3), np.float32)
    expected = _infer(model, x)
    cpu._packed_cache.clear()
    monkeypatch.setattr(cpu, "PACKED_CACHE_ENTRIES", 0)
    np.testing.assert_array_equal(_infer(model, x), expected)
    assert not cpu._packed_cache


def test_threads_share_the_packed_weight_cache():
    """Inference in several threads at once, on one model and on different ones, reads and
    fills the cache together and gives the results of serial calls."""
    rng = np.random.default_rng(12)
    models = [numlstm.LSTM(5, 16, seed=seed) for seed in range(3)]
    x = rng.standard_normal((20, 4, 5)).astype(np.float32)
    expected = [_infer(model, x) for model in models]
    cpu._packed_cache.clear()
    results, errors = {}, []
    barrier = threading.Barrier(6)

    def work(i):
        try:
            barrier.wait(10)
            results[i] = [_infer(models[i % 3], x) for _ in range(20)]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(results) == list(range(6))
    for i, outputs in results.items():
        for output in outputs:
            np.testing.assert_array_equal(output, expected[i % 3])
    assert all(_key(model) in cpu._packed_cache for model in models)


def test_training_packs_its_weights_at_every_call():
    """Training's weights change at every step: it neither reads nor fills the cache."""
    model = numlstm.LSTM(3, 8, seed=0)
    cpu._packed_cache.clear()
    output, _ = model(np.ones((2, 4, 3), np.float32))
    model.backward(np.ones_like(output))
    assert not cpu._packed_cache
