"""Properties of numlstm's forward (and backward) pass, each named after what it claims.

Configurations and arrays come from :mod:`lstm_cases`; the oracle is ``reference.py``.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st
from lstm_cases import (
    Case,
    assert_close_float32,
    cases,
    forward_backward,
    make_arrays,
    time_axis,
)
from reference import lstm_forward

import numlstm
from numlstm.backends import cpu
from numlstm.validation import CELLS

F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)

#: Larger than the gradient tests' cases: the forward pass alone is cheap. Every cell.
forward_cases = cases(max_steps=6, max_batch=4, max_size=4, cells=CELLS)


def run(case, arrays):
    """numlstm.forward on the case's arrays."""
    return numlstm.forward(
        arrays.x,
        arrays.params,
        arrays.hx,
        case.lengths,
        batch_first=case.batch_first,
        dropout_masks=arrays.masks,
    )


def assert_results_close(actual, expected, dtype=F64, names=("output", "h_n", "c_n")):
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, dtype=dtype, name=name)


def flatten(output, states):
    return output, states[0], states[1]


# ---------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------


@given(case=forward_cases)
def test_forward_equals_numpy_reference(case):
    arrays = make_arrays(case)
    output, states, _ = run(case, arrays)
    expected = lstm_forward(
        arrays.x,
        arrays.params,
        arrays.hx,
        case.lengths,
        batch_first=case.batch_first,
        dropout_masks=arrays.masks_time_major,
        cell=case.cell,
    )
    assert_results_close(flatten(output, states), flatten(*expected))


# ---------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------


def time_slice(array, case, where):
    """``array[where]`` along the time axis of the case's layout."""
    index = [slice(None)] * array.ndim
    index[time_axis(case)] = where
    return array[tuple(index)]


@st.composite
def causal_cases(draw):
    """Unidirectional stacks, or one bidirectional layer (whose forward half is causal)."""
    bidirectional = draw(st.booleans())
    case = draw(
        cases(
            max_steps=6,
            max_batch=4,
            max_size=4,
            bidirectional=bidirectional,
            max_layers=1 if bidirectional else 3,
        )
    )
    return case, draw(st.integers(1, case.steps))


@given(case_and_prefix=causal_cases())
def test_prefix_of_input_gives_prefix_of_output(case_and_prefix):
    """Causality: the output up to step k-1 depends only on x up to step k-1.

    With lengths, the prefix keeps ``min(length, k)`` steps of each element. For a
    bidirectional layer only the forward half of the output is causal.
    """
    case, k = case_and_prefix
    arrays = make_arrays(case)
    output, _, _ = run(case, arrays)
    lengths = None if case.lengths is None else [min(n, k) for n in case.lengths]
    masks = None if arrays.masks is None else [time_slice(m, case, slice(k)) for m in arrays.masks]
    prefix, _, _ = numlstm.forward(
        time_slice(arrays.x, case, slice(k)),
        arrays.params,
        arrays.hx,
        lengths,
        batch_first=case.batch_first,
        dropout_masks=masks,
    )
    half = slice(0, case.output_size)
    assert_close(prefix[..., half], time_slice(output, case, slice(k))[..., half], name="output")


@given(
    case=cases(
        max_steps=6, max_batch=4, max_size=4, bidirectional=True, max_layers=1, lengths=False
    ),
    data=st.data(),
)
def test_suffix_of_input_gives_suffix_of_reverse_output(case, data):
    """Anti-causality of the reverse direction: its output from step k on sees only x[k:]."""
    k = data.draw(st.integers(0, case.steps - 1), label="k")
    arrays = make_arrays(case)
    output, _, _ = run(case, arrays)
    suffix, _, _ = numlstm.forward(
        time_slice(arrays.x, case, slice(k, None)),
        arrays.params,
        arrays.hx,
        batch_first=case.batch_first,
    )
    half = slice(case.output_size, None)
    expected = time_slice(output, case, slice(k, None))[..., half]
    assert_close(suffix[..., half], expected, name="reverse output")


# ---------------------------------------------------------------------------------------
# Lengths and the batch
# ---------------------------------------------------------------------------------------


def element(array, case, b):
    """Batch element ``b`` of a caller-layout array (time first after indexing)."""
    return array[b] if case.batch_first else array[:, b]


@given(
    case=cases(
        max_steps=6,
        max_batch=4,
        max_size=4,
        layouts=("time_major", "batch_first"),
        padded=True,
        cells=CELLS,
    )
)
def test_lengths_equal_truncation(case):
    """Element b with length n gives what x[:n, b] alone (unbatched) gives; padding is zero.

    Both directions: the reverse direction starts at each element's last real step.
    """
    arrays = make_arrays(case)
    output, (h_n, c_n), _ = run(case, arrays)
    for b, n in enumerate(case.lengths):
        x_b = element(arrays.x, case, b)[:n]
        hx_b = None if arrays.hx is None else (arrays.hx[0][:, b], arrays.hx[1][:, b])
        masks_b = None
        if arrays.masks is not None:
            masks_b = [element(m, case, b)[:n] for m in arrays.masks]
        alone, (h_alone, c_alone), _ = numlstm.forward(
            x_b, arrays.params, hx_b, dropout_masks=masks_b
        )
        output_b = element(output, case, b)
        assert_close(output_b[:n], alone, name=f"output of element {b}")
        assert np.all(output_b[n:] == 0.0), f"padded output of element {b}"
        assert_close(h_n[:, b], h_alone, name=f"h_n of element {b}")
        assert_close(c_n[:, b], c_alone, name=f"c_n of element {b}")


def batch_take(array, case, order, *, states=False):
    """Batch elements ``order`` of a caller-layout array (states: axis 1)."""
    axis = 1 if states or not case.batch_first else 0
    return np.take(array, order, axis=axis)


@given(
    case=cases(max_steps=5, max_batch=4, max_size=4, layouts=("time_major", "batch_first")),
    data=st.data(),
)
def test_permuting_the_batch_permutes_outputs_and_gradients(case, data):
    order = data.draw(st.permutations(range(case.batch)), label="order")
    arrays = make_arrays(case)
    output, states, tape = run(case, arrays)
    d_x, d_states, grads = numlstm.backward(tape, arrays.d_output, arrays.d_hx)

    def take(a, states=False):
        return batch_take(a, case, order, states=states)

    p_output, p_states, p_tape = numlstm.forward(
        take(arrays.x),
        arrays.params,
        None if arrays.hx is None else tuple(take(a, states=True) for a in arrays.hx),
        None if case.lengths is None else [case.lengths[i] for i in order],
        batch_first=case.batch_first,
        dropout_masks=None if arrays.masks is None else [take(m) for m in arrays.masks],
    )
    p_d_x, p_d_states, p_grads = numlstm.backward(
        p_tape, take(arrays.d_output), tuple(take(a, states=True) for a in arrays.d_hx)
    )
    assert_close(p_output, take(output), name="output")
    assert_close(p_d_x, take(d_x), name="d_x")
    for name, a, e in zip(
        ("h_n", "c_n", "d_h0", "d_c0"), (*p_states, *p_d_states), (*states, *d_states), strict=True
    ):
        assert_close(a, take(e, states=True), name=name)
    for name, grad in grads.items():
        assert_close(p_grads[name], grad, name=name)


@given(
    case=cases(max_steps=5, max_batch=4, max_size=4, layouts=("time_major", "batch_first")),
    data=st.data(),
)
def test_changing_one_batch_element_leaves_the_others_unchanged(case, data):
    """Elements never mix: new x, states, mask and length for element j change nothing else.

    Exact equality: the other elements' rows go through the very same operations.
    """
    j = data.draw(st.integers(0, case.batch - 1), label="j")
    arrays = make_arrays(case)
    other = make_arrays(dataclasses.replace(case, seed=case.seed ^ 1))
    output, (h_n, c_n), _ = run(case, arrays)

    def replace_j(a, b, states=False):
        a = a.copy()
        if states or not case.batch_first:
            a[:, j] = b[:, j]
        else:
            a[j] = b[j]
        return a

    lengths = None if case.lengths is None else list(case.lengths)
    if lengths is not None:
        lengths[j] = data.draw(st.integers(1, case.steps), label="new length of j")
    changed = numlstm.forward(
        replace_j(arrays.x, other.x),
        arrays.params,
        None
        if arrays.hx is None
        else tuple(replace_j(a, b, states=True) for a, b in zip(arrays.hx, other.hx, strict=True)),
        lengths,
        batch_first=case.batch_first,
        dropout_masks=None
        if arrays.masks is None
        else [replace_j(a, b) for a, b in zip(arrays.masks, other.masks, strict=True)],
    )
    keep = [i for i in range(case.batch) if i != j]
    for name, before, after, states in (
        ("output", output, changed[0], False),
        ("h_n", h_n, changed[1][0], True),
        ("c_n", c_n, changed[1][1], True),
    ):
        np.testing.assert_array_equal(
            batch_take(after, case, keep, states=states),
            batch_take(before, case, keep, states=states),
            err_msg=name,
        )


# ---------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------


@given(case=forward_cases)
def test_float32_is_close_to_float64(case):
    """The same weights and inputs, cast to float32, give float64's results and gradients.

    Within 1e-4 of each array's largest magnitude, floored at 1 (see
    :func:`lstm_cases.assert_close_float32`): float32 rounds at ~6e-8, and these short
    sequences (T <= 6, up to 3 layers) were measured at 6e-7 at worst on that scale, so
    1e-4 leaves a wide margin while a float32-only bug would give errors of order one.
    """
    results = {dtype: forward_backward(case, make_arrays(case, dtype)) for dtype in (F64, F32)}
    for name, expected in results[F64].items():
        assert results[F32][name].dtype == F32, name
        assert_close_float32(results[F32][name], expected, 1e-4, name=name)


# ---------------------------------------------------------------------------------------
# Memory layouts
# ---------------------------------------------------------------------------------------


def strided(a):
    """A view with a step: every other element of a twice-as-long last axis."""
    big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def transposed_back(a):
    """The values of ``a`` as a transposed view of a transposed copy (reversed strides)."""
    return np.ascontiguousarray(a.T).T


def reversed_back(a):
    """The values of ``a`` as a view with negative strides on every axis."""
    flipped = tuple(slice(None, None, -1) for _ in range(a.ndim))
    return a[flipped].copy()[flipped]


NON_CONTIGUOUS = {
    "strided": strided,
    "transposed": transposed_back,
    "fortran": np.asfortranarray,
    "reversed": reversed_back,
}


@given(case=forward_cases, kind=st.sampled_from(sorted(NON_CONTIGUOUS)))
def test_non_contiguous_inputs_give_the_same_results_as_contiguous_copies(case, kind):
    """x, hx, parameters, masks, d_output and d_hx as strided, transposed, Fortran-order or
    reversed views: bit for bit what their C-contiguous copies give."""
    view = NON_CONTIGUOUS[kind]
    arrays = make_arrays(case)

    def converted(convert):
        def each(arrays_or_none):
            return (
                None
                if arrays_or_none is None
                else type(arrays_or_none)(convert(a) for a in arrays_or_none)
            )

        return dataclasses.replace(
            arrays,
            params={name: convert(p) for name, p in arrays.params.items()},
            x=convert(arrays.x),
            hx=each(arrays.hx),
            masks=each(arrays.masks),
            d_output=convert(arrays.d_output),
            d_h_n=convert(arrays.d_h_n),
            d_c_n=convert(arrays.d_c_n),
        )

    np.testing.assert_array_equal(view(arrays.x), arrays.x)
    expected = forward_backward(case, converted(np.ascontiguousarray))
    actual = forward_backward(case, converted(view))
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# ---------------------------------------------------------------------------------------
# Inference (no_grad)
# ---------------------------------------------------------------------------------------


@given(case=forward_cases)
def test_no_grad_gives_the_same_results_as_grad_mode(case):
    arrays = make_arrays(case)
    output, states, tape = run(case, arrays)
    assert tape is not None
    with numlstm.no_grad():
        assert not numlstm.is_grad_enabled()
        inferred, inferred_states, no_tape = run(case, arrays)
    assert no_tape is None
    assert numlstm.is_grad_enabled()
    assert_results_close(flatten(inferred, inferred_states), flatten(output, states))


def lstm_model(case, dtype="float64"):
    model = numlstm.LSTM(
        case.input_size, case.hidden_size, dtype=dtype, seed=case.seed, **case.numlstm_kwargs()
    )
    model.load_state_dict(make_arrays(case).params)
    return model


@pytest.mark.parametrize("stacked", [False, True], ids=["projection_pass", "stacked"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize(
    ("num_layers", "bidirectional", "proj_size", "cell"),
    [
        (1, False, 0, "standard"),
        (1, True, 0, "standard"),
        (2, True, 2, "standard"),
        (2, False, 3, "standard"),
        (2, True, 2, "peephole"),
        (2, True, 0, "ltm_stm"),
    ],
    ids=["forward", "bidirectional", "bi_proj_2layers", "proj_2layers", "peephole", "ltm_stm"],
)
def test_inference_path_equals_training_path_beyond_one_chunk(
    num_layers, bidirectional, proj_size, cell, batch_first, stacked
):
    """T = 150 spans three inference chunks of 64 steps (64 + 64 + 22, in both directions)
    where the weights are too large to stack; lengths end inside each chunk and on its
    edges. Stacked, every step reuses one step of gate rows."""
    assert cpu.INFERENCE_CHUNK == 64
    lengths = (150, 1, 64, 65, 100, 128, 129, 22)
    case = Case(
        steps=150,
        batch=len(lengths),
        input_size=3,
        hidden_size=4,
        num_layers=num_layers,
        bidirectional=bidirectional,
        proj_size=proj_size,
        bias=True,
        layout="batch_first" if batch_first else "time_major",
        lengths=lengths,
        with_hx=True,
        dropout=0.0,
        seed=1,
        cell=cell,
    )
    arrays = make_arrays(case)
    model = lstm_model(case)
    trained = model(arrays.x, arrays.hx, case.lengths)
    stacked_max_bytes = cpu.STACKED_WEIGHTS_MAX_BYTES if stacked else 0
    with mock.patch.object(cpu, "STACKED_WEIGHTS_MAX_BYTES", stacked_max_bytes), numlstm.no_grad():
        inferred = model(arrays.x, arrays.hx, case.lengths)
    assert_results_close(flatten(*inferred), flatten(*trained))
    expected = lstm_forward(
        arrays.x, arrays.params, arrays.hx, case.lengths, batch_first=batch_first, cell=cell
    )
    assert_results_close(flatten(*inferred), flatten(*expected))


@given(case=cases(max_steps=9, max_batch=4, max_size=4, cells=CELLS), data=st.data())
def test_inference_path_equals_training_path_for_any_chunk(case, data):
    """The inference chunk lengths are tunables: every value, down to 1, gives the same,
    with a projection pass (``INFERENCE_CHUNK``) and with stacked weights
    (``INFERENCE_STACKED_CHUNK``; a batch smaller than the threads takes the projection
    pass)."""
    chunk = data.draw(st.integers(1, case.steps + 1), label="chunk")
    arrays = make_arrays(case)
    output, states, _ = run(case, arrays)
    with (
        mock.patch.object(cpu, "INFERENCE_CHUNK", chunk),
        mock.patch.object(cpu, "INFERENCE_STACKED_CHUNK", chunk),
        numlstm.no_grad(),
    ):
        inferred, inferred_states, _ = run(case, arrays)
    assert_results_close(flatten(inferred, inferred_states), flatten(output, states))
