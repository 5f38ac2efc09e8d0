"""Gradients of every input and parameter against central finite differences, in float64.

The loss is ``sum(output * R) + sum(h_n * Rh) + sum(c_n * Rc)`` with random ``R``, ``Rh``,
``Rc`` (see :mod:`lstm_cases`), so ``backward(tape, R, (Rh, Rc))`` is its gradient. Every
element of every array gets its own central difference: the sizes are tiny, so that is
cheap, and it leaves no entry unchecked. Dropout is checked with fixed masks, identical in
every evaluation, so the loss is a smooth function of the inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import FD_RTOL, FD_STEP, central_differences
from hypothesis import given
from hypothesis import strategies as st
from lstm_cases import Case, cases, forward_backward, make_arrays, zero_states

import numlstm


def loss(arrays, output, h_n, c_n):
    return (
        np.sum(output * arrays.d_output) + np.sum(h_n * arrays.d_h_n) + np.sum(c_n * arrays.d_c_n)
    )


def loss_magnitude(arrays, output, h_n, c_n):
    """The sum of the loss's terms' magnitudes: the scale of its rounding error."""
    return (
        np.sum(np.abs(output * arrays.d_output))
        + np.sum(np.abs(h_n * arrays.d_h_n))
        + np.sum(np.abs(c_n * arrays.d_c_n))
    )


#: Rounding makes each evaluation of the loss off by about ``eps * loss_magnitude``, and a
#: central difference divides that by the step: an absolute error, the same for every
#: array. An array whose gradient is tiny everywhere (the recurrent weights of the top layer
#: after two steps from zero states, say, ~1e-6) cannot be checked to FD_RTOL of its own
#: largest entry, so the bound adds this floor. Measured over 300 random cases: at most
#: 3.6 x ``eps * loss_magnitude / FD_STEP``, so 64 leaves a wide margin while still being
#: ~1e-8 of a typical loss: far below any real error.
FD_NOISE = 64 * np.finfo(np.float64).eps / FD_STEP


def assert_matches_finite_differences(analytic, inputs, run, arrays):
    """Each analytic gradient equals the central differences of the loss in its input.

    Parameters
    ----------
    analytic : dict of str to array
        ``d_<name>`` for every input name.
    inputs : dict of str to array
        The arrays ``run`` reads, perturbed in place one element at a time.
    run : callable
        Computes ``(output, (h_n, c_n))`` (and anything after) from the current ``inputs``.
    arrays : Arrays
        Holds the loss weights.

    Each gradient must lie within ``FD_RTOL`` of its array's largest entry, plus the
    rounding floor ``FD_NOISE * loss_magnitude``.
    """

    def evaluate():
        output, (h_n, c_n) = run()[:2]
        return loss(arrays, output, h_n, c_n)

    output, (h_n, c_n) = run()[:2]
    magnitude = loss_magnitude(arrays, output, h_n, c_n)
    assert set(analytic) == {f"d_{name}" for name in inputs}
    for name, array in inputs.items():
        numeric = central_differences(evaluate, array)
        grad = analytic[f"d_{name}"]
        assert grad.shape == numeric.shape, name
        scale = float(np.max(np.abs(numeric), initial=0.0))
        error = float(np.max(np.abs(grad - numeric), initial=0.0))
        bound = FD_RTOL * scale + FD_NOISE * magnitude
        assert error <= bound, (
            f"d loss / d {name}: max error {error:.3g} against central differences exceeds "
            f"{bound:.3g} (largest entry {scale:.3g})\nanalytic:\n{grad}\n"
            f"central differences:\n{numeric}"
        )


def gradients_only(results):
    return {name: value for name, value in results.items() if name.startswith("d_")}


@given(case=cases())
def test_functional_gradients_match_finite_differences(case):
    """Gradients of x, h0, c0 and every parameter, over every feature and layout."""
    check_functional_gradients(case)


@given(case=cases(cells=("peephole", "ltm_stm")))
def test_cell_variant_gradients_match_finite_differences(case):
    """The same for the peephole and LTM/STM cells, with their own parameters."""
    check_functional_gradients(case)


def check_functional_gradients(case):
    arrays = make_arrays(case)
    analytic = gradients_only(forward_backward(case, arrays))
    # Without given states (hx=None) the gradients are those at zero states.
    h0, c0 = arrays.hx if case.with_hx else zero_states(case)

    def run():
        return numlstm.forward(
            arrays.x,
            arrays.params,
            (h0, c0),
            case.lengths,
            batch_first=case.batch_first,
            dropout_masks=arrays.masks,
        )

    # Backward has run: the arrays a tape may refer to can now be perturbed in place.
    inputs = {"x": arrays.x, "h0": h0, "c0": c0, **arrays.params}
    assert_matches_finite_differences(analytic, inputs, run, arrays)


#: The cell variants with given states: without bias and from zero states, the LTM/STM
#: cell's layer k outputs exact zeros for its first k + 1 steps (its use gate reads the kept
#: memory, zero at first), so dropout could not act on a short sequence.
dropout_cases = cases(min_layers=2, dropout=False) | cases(
    min_layers=2, dropout=False, cells=("peephole", "ltm_stm"), with_hx=True
)


@given(case=dropout_cases, dropout=st.sampled_from([0.25, 0.5]))
def test_lstm_class_gradients_in_training_mode_with_dropout_match_finite_differences(case, dropout):
    """numlstm.LSTM.backward, with dropout drawn by the model itself, is the exact gradient.

    A model built with the same seed draws the same masks in its first forward pass (the
    generator has drawn only the initial parameters before), so building a fresh model
    for every evaluation keeps the masks fixed through the finite differences.
    """
    arrays = make_arrays(case)

    def model():
        lstm = numlstm.LSTM(
            case.input_size,
            case.hidden_size,
            dropout=dropout,
            dtype="float64",
            seed=case.seed,
            **case.numlstm_kwargs(),
        )
        lstm.load_state_dict(arrays.params)
        return lstm

    lstm = model()
    assert lstm.training
    output, _ = lstm(arrays.x, arrays.hx, case.lengths)
    d_x, (d_h0, d_c0) = lstm.backward(arrays.d_output, arrays.d_hx)
    grads = {f"d_{name}": grad for name, grad in lstm.grads.items()}
    analytic = {"d_x": d_x, "d_h0": d_h0, "d_c0": d_c0, **grads}
    # Dropout acted: every mask entry is 0 or 1 / (1 - p), never 1. The output can depend
    # only weakly on a layer's input (Hypothesis drew a 3-layer LTM/STM net of one unit
    # whose output moved by 7e-7), so any difference counts, not one beyond allclose's.
    eval_output, _ = model().eval()(arrays.x, arrays.hx, case.lengths)
    assert not np.array_equal(output, eval_output)

    h0, c0 = arrays.hx if case.with_hx else zero_states(case)

    def run():
        return model()(arrays.x, (h0, c0), case.lengths)

    inputs = {"x": arrays.x, "h0": h0, "c0": c0, **arrays.params}
    assert_matches_finite_differences(analytic, inputs, run, arrays)


def padded_steps(array, case, b, n):
    """Element ``b``'s steps from ``n`` on, in the case's (batched) layout."""
    return array[b, n:] if case.batch_first else array[n:, b]


@given(case=cases(layouts=("time_major", "batch_first"), padded=True))
def test_gradient_at_padded_steps_of_x_is_exactly_zero(case):
    d_x = forward_backward(case, make_arrays(case))["d_x"]
    assert any(n < case.steps for n in case.lengths)
    for b, n in enumerate(case.lengths):
        assert np.all(padded_steps(d_x, case, b, n) == 0.0), f"element {b}, length {n}"


@given(case=cases(layouts=("time_major", "batch_first"), padded=True))
def test_gradient_at_padded_steps_of_output_is_ignored(case):
    """The output is constant (zero) at padded steps, so d_output there changes nothing."""
    arrays = make_arrays(case)
    d_output = arrays.d_output.copy()
    for b, n in enumerate(case.lengths):
        padded_steps(d_output, case, b, n)[...] = 1e3
    expected = gradients_only(forward_backward(case, arrays))
    actual = gradients_only(forward_backward(case, dataclasses.replace(arrays, d_output=d_output)))
    for name, grad in expected.items():
        np.testing.assert_array_equal(actual[name], grad, err_msg=name)


def run_after_freeing(fill, shapes, case, arrays):
    """:func:`forward_backward` right after freeing arrays of ``shapes`` full of ``fill``.

    NumPy's allocator hands freed blocks of small arrays back to the next allocation of the
    same size, so buffers that a kernel allocates with ``np.empty`` start with ``fill``.
    """
    for shape in shapes:
        blocks = [np.full(shape, fill) for _ in range(16)]
        del blocks
    return forward_backward(case, arrays)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize(
    ("proj_size", "cell"),
    [(0, "standard"), (2, "standard"), (2, "peephole"), (0, "ltm_stm")],
    ids=["no_projection", "projection", "peephole", "ltm_stm"],
)
def test_results_do_not_depend_on_what_freed_memory_held(proj_size, cell, bidirectional):
    """Padded steps leave some work buffers unwritten; nothing may read them.

    The same call runs twice, once after freeing blocks full of zeros and once after
    freeing blocks full of NaN, of the sizes of the buffers a layer allocates. Every result
    must be finite and identical.
    """
    case = Case(
        steps=4,
        batch=2,
        input_size=3,
        hidden_size=3,
        num_layers=2,
        bidirectional=bidirectional,
        proj_size=proj_size,
        bias=True,
        layout="time_major",
        lengths=(1, 4),
        with_hx=False,
        dropout=0.0,
        seed=7,
        cell=cell,
    )
    arrays = make_arrays(case)
    steps, batch, hidden = case.steps, case.batch, case.hidden_size
    shapes = [(steps, batch, n) for n in {hidden, case.output_size, case.width}]
    shapes += [(steps + 1, batch, hidden), (steps, batch, 4 * hidden)]
    clean = run_after_freeing(0.0, shapes, case, arrays)
    dirty = run_after_freeing(np.nan, shapes, case, arrays)
    for name, value in clean.items():
        assert np.isfinite(dirty[name]).all(), f"{name} is not finite:\n{dirty[name]}"
        np.testing.assert_array_equal(dirty[name], value, err_msg=name)
