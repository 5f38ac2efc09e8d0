"""The behaviour of ``numlstm.LSTM`` as a model: initialisation, gradients accumulation,
train/eval and dropout, ``no_grad``, saturation, memory, threads, backend dispatch, and the
small API around the parameters (DESIGN.md §2 and §3).
"""

from __future__ import annotations

import threading
import tracemalloc
import warnings

import numpy as np
import pytest
from conftest import FD_RTOL, assert_close, central_differences
from reference import lstm_forward

import numlstm


def inputs(rng, steps, batch, features, dtype=np.float64):
    return rng.standard_normal((steps, batch, features)).astype(dtype)


def nonzero_everywhere(arrays):
    return all(np.any(a != 0) for a in arrays)


# ---------------------------------------------------------------------------------------
# Initialisation, as PyTorch's
# ---------------------------------------------------------------------------------------

INIT_CONFIGS = {
    "single": dict(num_layers=1),
    "deep-bi-proj": dict(num_layers=3, bidirectional=True, proj_size=5),
    "no-bias": dict(num_layers=2, bias=False),
}


@pytest.mark.parametrize("config", INIT_CONFIGS.values(), ids=INIT_CONFIGS.keys())
def test_parameters_start_uniform_in_plus_minus_one_over_sqrt_hidden(config):
    hidden = 64
    bound = 1.0 / np.sqrt(hidden)
    model = numlstm.LSTM(7, hidden, **config, seed=0)
    for name, p in model.state_dict().items():
        assert np.abs(p).max() <= bound, name
        # The spread fills the range: each parameter comes close to both ends.
        assert p.max() > 0.9 * bound and p.min() < -0.9 * bound, name
    # All of them together are uniform: mean 0, standard deviation bound / sqrt(3), and
    # a flat histogram (each bound is about 5 standard errors wide).
    w = np.concatenate([p.ravel() for p in model.parameters()]).astype(np.float64) / bound
    n = w.size
    assert abs(w.mean()) < 5 * np.sqrt(1 / 3 / n)
    assert abs(w.std() * np.sqrt(3) - 1) < 5 * 0.5 * np.sqrt(0.8 / n)
    counts, _ = np.histogram(w, bins=8, range=(-1, 1))
    assert np.all(np.abs(counts - n / 8) < 5 * np.sqrt(n / 8)), counts


def test_parameters_are_distinct_per_gate_bias_direction_and_layer():
    hidden = 6
    model = numlstm.LSTM(4, hidden, num_layers=2, bidirectional=True, seed=0)
    state = model.state_dict()
    for name, p in state.items():
        gates = p.reshape(4, hidden, -1)
        for a in range(4):
            for b in range(a + 1, 4):
                assert not np.array_equal(gates[a], gates[b]), (name, a, b)
    assert not np.array_equal(state["bias_ih_l0"], state["bias_hh_l0"])
    assert not np.array_equal(state["weight_hh_l0"], state["weight_hh_l0_reverse"])
    assert not np.array_equal(state["weight_hh_l0"], state["weight_hh_l1"])
    assert not np.array_equal(state["weight_ih_l1"], state["weight_ih_l1_reverse"])


def test_same_seed_gives_the_same_parameters_and_another_seed_others():
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)
    first = numlstm.LSTM(**kwargs, seed=42).state_dict()
    again = numlstm.LSTM(**kwargs, seed=42).state_dict()
    other = numlstm.LSTM(**kwargs, seed=43).state_dict()
    unseeded = [numlstm.LSTM(**kwargs).state_dict() for _ in range(2)]
    assert list(first) == list(again) == list(other)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
        assert not np.any(first[name] == other[name]), name
        assert not np.array_equal(unseeded[0][name], unseeded[1][name]), name


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", np.float32), ("float64", np.float64), (np.float64, np.float64)],
)
def test_parameters_and_grads_have_the_requested_dtype(dtype, expected):
    model = numlstm.LSTM(3, 4, num_layers=2, proj_size=2, dtype=dtype, seed=0)
    assert model.dtype == np.dtype(expected)
    for name, p in model.state_dict().items():
        assert p.dtype == expected, name
        assert model.grads[name].dtype == expected, name
    x = np.zeros((2, 1, 3), expected)
    output, (h_n, c_n) = model(x)
    assert output.dtype == h_n.dtype == c_n.dtype == expected
    d_x, (d_h0, d_c0) = model.backward(np.ones_like(output))
    assert d_x.dtype == d_h0.dtype == d_c0.dtype == expected


def test_default_dtype_is_float32():
    model = numlstm.LSTM(3, 4, seed=0)
    assert model.dtype == np.float32
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_parameter_names_shapes_and_order_for_one_config():
    model = numlstm.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, seed=0)
    expected = [
        ("weight_ih_l0", (20, 3)),
        ("weight_hh_l0", (20, 2)),
        ("bias_ih_l0", (20,)),
        ("bias_hh_l0", (20,)),
        ("weight_hr_l0", (2, 5)),
        ("weight_ih_l0_reverse", (20, 3)),
        ("weight_hh_l0_reverse", (20, 2)),
        ("bias_ih_l0_reverse", (20,)),
        ("bias_hh_l0_reverse", (20,)),
        ("weight_hr_l0_reverse", (2, 5)),
        ("weight_ih_l1", (20, 4)),
        ("weight_hh_l1", (20, 2)),
        ("bias_ih_l1", (20,)),
        ("bias_hh_l1", (20,)),
        ("weight_hr_l1", (2, 5)),
        ("weight_ih_l1_reverse", (20, 4)),
        ("weight_hh_l1_reverse", (20, 2)),
        ("bias_ih_l1_reverse", (20,)),
        ("bias_hh_l1_reverse", (20,)),
        ("weight_hr_l1_reverse", (2, 5)),
    ]
    assert [(k, v.shape) for k, v in model.state_dict().items()] == expected
    assert [(k, v.shape) for k, v in model.named_parameters()] == expected


TORCH_CONFIGS = {
    "single": dict(),
    "two-layers": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True),
    "projection": dict(proj_size=3),
    "no-bias": dict(bias=False),
    "three-layers-bi-proj-no-bias": dict(num_layers=3, bidirectional=True, proj_size=2, bias=False),
}


@pytest.mark.parametrize("config", TORCH_CONFIGS.values(), ids=TORCH_CONFIGS.keys())
def test_parameter_names_shapes_and_order_equal_torch(config):
    torch = pytest.importorskip("torch")
    model = numlstm.LSTM(3, 5, **config, seed=0)
    reference = torch.nn.LSTM(3, 5, **config)
    ours = [(k, v.shape) for k, v in model.state_dict().items()]
    theirs = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert ours == theirs
    # And the state dict loads into torch as the docstring says.
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})


# ---------------------------------------------------------------------------------------
# Gradients: keys, accumulation, zero_grad, the tape is kept
# ---------------------------------------------------------------------------------------


@pytest.fixture
def small_model():
    model = numlstm.LSTM(
        3, 4, num_layers=2, bidirectional=True, proj_size=2, dtype="float64", seed=0
    )
    rng = np.random.default_rng(0)
    x = inputs(rng, 6, 3, 3)
    d_out = inputs(rng, 6, 3, 4)
    return model, x, d_out


def test_grads_have_the_keys_shapes_and_dtypes_of_the_state_dict(small_model):
    model, _, _ = small_model
    state = model.state_dict()
    assert list(model.grads) == list(state)
    for name, p in state.items():
        assert model.grads[name].shape == p.shape, name
        assert model.grads[name].dtype == p.dtype, name
        assert not model.grads[name].any(), name


def test_grads_accumulate_over_forward_backward_pairs_and_zero_grad_resets(small_model):
    model, x, d_out = small_model
    model(x)
    d_x_first, _ = model.backward(d_out)
    first = {k: v.copy() for k, v in model.grads.items()}
    assert nonzero_everywhere(first.values())
    model(x)
    d_x_second, _ = model.backward(d_out)
    np.testing.assert_array_equal(d_x_second, d_x_first)
    for name, grad in model.grads.items():
        np.testing.assert_array_equal(grad, 2 * first[name], err_msg=name)
    model.zero_grad()
    assert not any(g.any() for g in model.grads.values())
    model(x)
    model.backward(d_out)
    for name, grad in model.grads.items():
        np.testing.assert_array_equal(grad, first[name], err_msg=name)


def test_backward_twice_after_one_forward_uses_the_kept_tape(small_model):
    model, x, d_out = small_model
    model(x)
    d_x_first, (d_h0_first, d_c0_first) = model.backward(d_out)
    first = {k: v.copy() for k, v in model.grads.items()}
    d_x_second, (d_h0_second, d_c0_second) = model.backward(d_out)
    np.testing.assert_array_equal(d_x_second, d_x_first)
    np.testing.assert_array_equal(d_h0_second, d_h0_first)
    np.testing.assert_array_equal(d_c0_second, d_c0_first)
    for name, grad in model.grads.items():
        np.testing.assert_array_equal(grad, 2 * first[name], err_msg=name)


def test_zero_grad_keeps_the_grad_arrays(small_model):
    """Optimisers may hold references to ``grads`` entries; zero_grad works in place."""
    model, x, d_out = small_model
    held = dict(model.grads)
    model(x)
    model.backward(d_out)
    assert all(held[k] is model.grads[k] for k in held)
    assert nonzero_everywhere(held.values())
    model.zero_grad()
    assert all(held[k] is model.grads[k] and not held[k].any() for k in held)


# ---------------------------------------------------------------------------------------
# Train / eval and dropout
# ---------------------------------------------------------------------------------------

DROPOUT_KW = dict(input_size=3, hidden_size=4, num_layers=3, bidirectional=True, dtype="float64")


def test_eval_output_equals_the_output_without_dropout():
    rng = np.random.default_rng(1)
    x = inputs(rng, 7, 3, 3)
    with_dropout = numlstm.LSTM(**DROPOUT_KW, dropout=0.5, seed=0).eval()
    without = numlstm.LSTM(**DROPOUT_KW, dropout=0.0, seed=0)
    out_eval, (h_eval, c_eval) = with_dropout(x)
    out_plain, (h_plain, c_plain) = without(x)
    np.testing.assert_array_equal(out_eval, out_plain)
    np.testing.assert_array_equal(h_eval, h_plain)
    np.testing.assert_array_equal(c_eval, c_plain)
    expected, _ = lstm_forward(x, without.state_dict())
    assert_close(out_eval, expected, name="output")
    assert with_dropout._tape.dropout_masks == []
    # eval() and train() switch the mode and return the model.
    assert with_dropout.training is False
    assert with_dropout.train() is with_dropout and with_dropout.training is True
    out_train, _ = with_dropout(x)
    assert not np.allclose(out_train, out_eval)


def test_training_outputs_differ_between_calls_and_follow_the_recorded_masks():
    rng = np.random.default_rng(2)
    x = inputs(rng, 7, 3, 3)
    model = numlstm.LSTM(**DROPOUT_KW, dropout=0.4, seed=0)
    params = model.state_dict()
    outputs = []
    for _ in range(2):
        output, (h_n, c_n) = model(x)
        masks = model._tape.dropout_masks
        assert len(masks) == DROPOUT_KW["num_layers"] - 1
        for mask in masks:
            assert mask.shape == (7, 3, 8)
            assert set(np.unique(mask)) <= {0.0, 1 / 0.6}
        expected, (h_ref, c_ref) = lstm_forward(x, params, dropout_masks=masks)
        assert_close(output, expected, name="output")
        assert_close(h_n, h_ref, name="h_n")
        assert_close(c_n, c_ref, name="c_n")
        outputs.append(output)
    assert not np.allclose(outputs[0], outputs[1])


def test_dropout_drops_the_requested_fraction():
    model = numlstm.LSTM(3, 16, num_layers=2, dropout=0.3, dtype="float64", seed=0)
    model(np.zeros((200, 8, 3)))
    mask = model._tape.dropout_masks[0]
    assert abs(np.mean(mask == 0) - 0.3) < 0.02
    np.testing.assert_allclose(mask[mask != 0], 1 / 0.7)


def test_dropout_is_reproducible_from_the_seed():
    rng = np.random.default_rng(3)
    xs = [inputs(rng, 5, 2, 3) for _ in range(3)]
    first = numlstm.LSTM(**DROPOUT_KW, dropout=0.5, seed=7)
    second = numlstm.LSTM(**DROPOUT_KW, dropout=0.5, seed=7)
    other = numlstm.LSTM(**DROPOUT_KW, dropout=0.5, seed=8)
    other.load_state_dict(first.state_dict())  # same weights, other masks
    for x in xs:
        out_first, _ = first(x)
        out_second, _ = second(x)
        out_other, _ = other(x)
        np.testing.assert_array_equal(out_first, out_second)
        assert not np.array_equal(out_first, out_other)


def _loss(output, d_out):
    return float(np.sum(output * d_out))


def test_backward_with_dropout_matches_finite_differences_with_the_same_masks():
    rng = np.random.default_rng(4)
    kw = dict(input_size=3, hidden_size=3, num_layers=2, bidirectional=True, dtype="float64")
    model = numlstm.LSTM(**kw, dropout=0.5, seed=1)
    x = inputs(rng, 4, 2, 3)
    h0 = rng.standard_normal((4, 2, 3))
    c0 = rng.standard_normal((4, 2, 3))
    lengths = [4, 2]
    output, _ = model(x, (h0, c0), lengths)
    masks = [m.copy() for m in model._tape.dropout_masks]
    assert any(np.any(m == 0) for m in masks)  # some units are really dropped
    d_out = rng.standard_normal(output.shape)
    d_x, (d_h0, _) = model.backward(d_out)
    params = model.state_dict()

    def loss():
        out, _, _ = numlstm.forward(x, params, (h0, c0), lengths, dropout_masks=masks)
        return _loss(out, d_out)

    checks = [("x", x, d_x), ("h0", h0, d_h0)]
    checks += [(name, params[name], model.grads[name]) for name in params if "l1" in name]
    checks += [("weight_hh_l0", params["weight_hh_l0"], model.grads["weight_hh_l0"])]
    for name, array, analytic in checks:
        numeric = central_differences(loss, array)
        assert_close(analytic, numeric, rtol=FD_RTOL, name=name)
    # Without the masks, the finite differences would not match: the masks matter.
    plain = numlstm.forward(x, params, (h0, c0), lengths)[0]
    assert not np.allclose(plain, output)


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match=r"dropout=0\.5.*num_layers=1"):
        numlstm.LSTM(3, 4, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        numlstm.LSTM(3, 4, num_layers=2, dropout=0.5)
        numlstm.LSTM(3, 4, dropout=0.0)


# ---------------------------------------------------------------------------------------
# no_grad
# ---------------------------------------------------------------------------------------


def test_forward_under_no_grad_saves_nothing_and_gives_the_same_output():
    rng = np.random.default_rng(5)
    x = inputs(rng, 6, 2, 3)
    model = numlstm.LSTM(3, 4, num_layers=2, dtype="float64", seed=0)
    with numlstm.no_grad():
        assert numlstm.is_grad_enabled() is False
        out_inference, (h_inf, c_inf) = model(x)
        _, _, tape = numlstm.forward(x, model.state_dict())
    assert tape is None
    assert model._tape is None
    with pytest.raises(ValueError, match="no_grad"):
        model.backward(np.ones_like(out_inference))
    assert numlstm.is_grad_enabled() is True
    out_training, (h_tr, c_tr) = model(x)
    np.testing.assert_array_equal(out_inference, out_training)
    np.testing.assert_array_equal(h_inf, h_tr)
    np.testing.assert_array_equal(c_inf, c_tr)


def test_a_forward_under_no_grad_keeps_the_tape_of_the_last_training_forward():
    """As documented in ``LSTM.forward``: only a call outside no_grad replaces the tape."""
    rng = np.random.default_rng(6)
    x, other = inputs(rng, 6, 2, 3), inputs(rng, 6, 2, 3)
    d_out = inputs(rng, 6, 2, 4)
    model = numlstm.LSTM(3, 4, dtype="float64", seed=0)
    model(x)
    expected, _ = model.backward(d_out)
    with numlstm.no_grad():
        model(other)
    d_x, _ = model.backward(d_out)
    np.testing.assert_array_equal(d_x, expected)


def test_a_forward_that_fails_its_checks_keeps_the_tape_of_the_last_one():
    """A training forward releases the earlier tape only once its inputs have passed their
    checks: after a call that raises, backward still runs through the last good pass."""
    rng = np.random.default_rng(6)
    x, d_out = inputs(rng, 6, 2, 3), inputs(rng, 6, 2, 4)
    model = numlstm.LSTM(3, 4, dtype="float64", seed=0)
    model(x)
    expected, _ = model.backward(d_out)
    with pytest.raises(ValueError, match="x"):
        model(inputs(rng, 6, 2, 5))  # 5 features for a model of 3
    with pytest.raises(ValueError, match="lengths"):
        model(x, lengths=[7, 1])
    d_x, _ = model.backward(d_out)
    np.testing.assert_array_equal(d_x, expected)


def test_no_grad_works_as_a_decorator():
    model = numlstm.LSTM(3, 4, seed=0)

    @numlstm.no_grad()
    def infer(x):
        """Docstring kept."""
        return numlstm.is_grad_enabled(), model(x)

    enabled, (output, _) = infer(np.zeros((3, 1, 3), np.float32))
    assert enabled is False
    assert output.shape == (3, 1, 4)
    assert model._tape is None
    assert numlstm.is_grad_enabled() is True
    assert infer.__name__ == "infer" and infer.__doc__ == "Docstring kept."


def test_no_grad_nests_and_restores_even_on_errors():
    assert numlstm.is_grad_enabled()
    with numlstm.no_grad():
        with numlstm.no_grad():
            assert not numlstm.is_grad_enabled()
        assert not numlstm.is_grad_enabled()
    assert numlstm.is_grad_enabled()
    with pytest.raises(KeyError), numlstm.no_grad():
        raise KeyError("inside")
    assert numlstm.is_grad_enabled()
    guard = numlstm.no_grad()
    with guard:  # one instance used twice in a row
        pass
    with guard:
        assert not numlstm.is_grad_enabled()
    assert numlstm.is_grad_enabled()


def test_no_grad_is_thread_local():
    x = np.zeros((3, 1, 3), np.float32)
    model = numlstm.LSTM(3, 4, seed=0)
    seen = {}
    main_inside, worker_inside, release = (threading.Event() for _ in range(3))

    def worker():
        main_inside.wait(10)
        seen["enabled"] = numlstm.is_grad_enabled()  # the main thread's no_grad is not ours
        model(x)
        seen["tape"] = model._tape
        with numlstm.no_grad():
            seen["inside"] = numlstm.is_grad_enabled()
            worker_inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with numlstm.no_grad():
            main_inside.set()
            assert worker_inside.wait(10)
            assert numlstm.is_grad_enabled() is False
        assert numlstm.is_grad_enabled() is True  # while the worker is inside its no_grad
    finally:
        release.set()
        thread.join(10)
    assert seen == {"enabled": True, "tape": seen["tape"], "inside": False}
    assert seen["tape"] is not None


# ---------------------------------------------------------------------------------------
# Saturation: huge inputs and weights give finite results, silently
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "magnitude"), [("float64", 1e4), ("float32", 3e4)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("weight_scale", [1.0, 100.0])
def test_saturating_inputs_give_finite_outputs_and_gradients_without_warnings(
    dtype, magnitude, weight_scale
):
    rng = np.random.default_rng(7)
    model = numlstm.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=4, dtype=dtype, seed=0)
    for _, p in model.named_parameters():
        p *= weight_scale
    signs = rng.choice([-1.0, 1.0], size=(20, 3, 3))
    x = (magnitude * signs).astype(dtype)
    h0 = (magnitude * rng.choice([-1.0, 1.0], size=(4, 3, 4))).astype(dtype)
    c0 = (magnitude * rng.choice([-1.0, 1.0], size=(4, 3, 8))).astype(dtype)
    d_out = rng.standard_normal((20, 3, 8)).astype(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        output, (h_n, c_n) = model(x, (h0, c0))
        d_x, (d_h0, d_c0) = model.backward(d_out, (np.ones_like(h_n), np.ones_like(c_n)))
    results = {
        "output": output,
        "h_n": h_n,
        "c_n": c_n,
        "d_x": d_x,
        "d_h0": d_h0,
        "d_c0": d_c0,
        **model.grads,
    }
    for name, value in results.items():
        assert np.isfinite(value).all(), name
    # The saturated gates still compute the right thing.
    expected, _ = lstm_forward(
        x.astype(np.float64),
        {k: v.astype(np.float64) for k, v in model.state_dict().items()},
        (h0.astype(np.float64), c0.astype(np.float64)),
    )
    assert_close(output, expected, dtype=dtype, name="output")


def test_padded_steps_never_feed_uninitialised_memory_into_the_gradients():
    """With projection and lengths, the gradients must not depend on what the allocator
    hands back: blocks freed full of NaN are reused by ``np.empty`` in the next call."""
    rng = np.random.default_rng(13)
    steps, batch, hidden = 20, 3, 8
    model = numlstm.LSTM(3, hidden, proj_size=4, bidirectional=True, dtype="float64", seed=0)
    x = inputs(rng, steps, batch, 3)
    d_out = inputs(rng, steps, batch, 8)
    lengths = [steps, 11, 1]
    model(x, lengths=lengths)
    model.backward(d_out)
    clean = {k: v.copy() for k, v in model.grads.items()}
    assert all(np.isfinite(v).all() for v in clean.values())
    for _ in range(10):
        poison = [np.full((steps, batch, hidden), np.nan) for _ in range(8)]
        del poison
        model.zero_grad()
        model(x, lengths=lengths)
        model.backward(d_out)
        for name, grad in model.grads.items():
            np.testing.assert_array_equal(grad, clean[name], err_msg=name)


# ---------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_buffer_pool(monkeypatch):
    """Every buffer allocated afresh, as a call needs it: the CPU backend's pool
    (``tests/test_buffers.py``) would otherwise hand out buffers of earlier calls, whose
    memory the traces below do not see."""
    from numlstm.backends import cpu

    cpu.release_memory()
    monkeypatch.setattr(cpu.buffer_pool, "max_bytes", 0)


def traced_peak(function):
    """Peak bytes NumPy and Python allocate while ``function`` runs, and its result."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        result = function()
        return tracemalloc.get_traced_memory()[1] - start, result
    finally:
        tracemalloc.stop()


@pytest.mark.usefixtures("no_buffer_pool")
@pytest.mark.parametrize("proj_size", [0, 16])
def test_inference_memory_is_independent_of_sequence_length_beyond_the_output(proj_size):
    rng = np.random.default_rng(8)
    batch, n_in, hidden = 4, 8, 32
    model = numlstm.LSTM(n_in, hidden, proj_size=proj_size, seed=0)

    @numlstm.no_grad()
    def infer(x):
        return model(x)[0]

    infer(inputs(rng, 3, batch, n_in, np.float32))  # warm up outside the trace
    extra = {}
    for steps in (1000, 8000):
        x = inputs(rng, steps, batch, n_in, np.float32)
        peak, output = traced_peak(lambda x=x: infer(x))
        extra[steps] = peak - output.nbytes
    # The output grows by 7000 * 4 * H_out * 4 bytes (>= 448 KB); what is beyond it must not.
    assert abs(extra[8000] - extra[1000]) < 16 * 1024, extra
    # And what is beyond it is small: a chunk of gates and two states, not the tape.
    assert extra[8000] < 64 * batch * 4 * hidden * 4 * 1.5 + 64 * 1024, extra


@pytest.mark.usefixtures("no_buffer_pool")
def test_training_memory_grows_linearly_with_sequence_length():
    rng = np.random.default_rng(9)
    batch, n_in, hidden = 4, 8, 32
    model = numlstm.LSTM(n_in, hidden, seed=0)
    model(np.zeros((2, batch, n_in), np.float32))  # warm up outside the trace
    model.backward(np.zeros((2, batch, hidden), np.float32))
    peaks = {}
    for steps in (2000, 8000):
        x = inputs(rng, steps, batch, n_in, np.float32)
        d_out = inputs(rng, steps, batch, hidden, np.float32)

        def step(x=x, d_out=d_out):
            model(x)
            return model.backward(d_out)

        peaks[steps], _ = traced_peak(step)
    ratio = peaks[8000] / peaks[2000]
    assert 3.7 < ratio < 4.3, peaks


@pytest.mark.usefixtures("no_buffer_pool")
def test_a_training_loop_holds_one_tape_at_a_time():
    """The next training forward releases the last one's tape before it allocates its own:
    a second training step peaks no higher than the first, without a second tape."""
    steps, batch, n_in, hidden = 20_000, 1, 4, 32
    rng = np.random.default_rng(11)
    model = numlstm.LSTM(n_in, hidden, seed=0)
    x = inputs(rng, steps, batch, n_in, np.float32)
    d_out = inputs(rng, steps, batch, hidden, np.float32)
    model(x[:2])  # imports and loads the compiled kernels outside the trace
    model.backward(d_out[:2])
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        peaks = []
        for _ in range(2):
            tracemalloc.reset_peak()
            model(x)
            model.backward(d_out)
            peaks.append(tracemalloc.get_traced_memory()[1] - start)
    finally:
        tracemalloc.stop()
    # Each step needs T B (11 H + 2 I) itemsize = 28.8 MB (see the next test); the first
    # step's tape alive during the second would add its input copy, gates and states,
    # T B (I + 6 H) itemsize = 15.7 MB.
    assert peaks[1] < peaks[0] + (1 << 20), peaks


@pytest.mark.usefixtures("no_buffer_pool")
def test_a_sequence_of_100000_steps_trains_within_the_tape_bound():
    steps, batch, n_in, hidden = 100_000, 1, 4, 32
    itemsize = 4  # float32
    rng = np.random.default_rng(10)
    model = numlstm.LSTM(n_in, hidden, seed=0)
    x = inputs(rng, steps, batch, n_in, np.float32)
    d_out = inputs(rng, steps, batch, hidden, np.float32)

    def step():
        output, (h_n, c_n) = model(x)
        return output, h_n, c_n, model.backward(d_out)

    model(x[:2])  # imports and loads the compiled kernels outside the trace
    model.backward(d_out[:2])
    model.zero_grad()
    peak, (output, h_n, c_n, (d_x, (d_h0, d_c0))) = traced_peak(step)
    # What must be alive at once, at the end of backward (x and d_out are the caller's):
    #   tape:     x     (T, B, I)            its own copy of the input (the caller may reuse x)
    #             gates (T, B, 4H)           activations i, f, g, o of every step
    #             c_seq (T + 1, B, H)        every long-term memory
    #             h_seq (T + 1, B, H)        every short-term memory
    #   output:   y     (T, B, H)            returned to the caller
    #   backward: d_gates (T, B, 4H)         the gate gradients, for the weight GEMMs
    #             d_x   (T, B, I)            returned
    # = T B (11 H + 2 I) itemsize = 100000 * 1 * (11 * 32 + 2 * 4) * 4 bytes = 144 MB, plus
    # O(B H) states and O(H (4H + I)) weight gradients. The slack, 5% (7.2 MB) and 1 MiB for
    # Python objects, is below one more T-sized array of H features (12.8 MB): a second copy
    # of the gates or of a state sequence, or a float64 temporary, breaks the bound.
    derived = steps * batch * (11 * hidden + 2 * n_in) * itemsize
    bound = 1.05 * derived + 2**20
    assert peak < bound, (peak, derived)
    for value in (output, h_n, c_n, d_x, d_h0, d_c0, *model.grads.values()):
        assert np.isfinite(value).all()
    assert nonzero_everywhere(model.grads.values())
    assert np.abs(d_x[0]).max() > 0  # the gradient reached the first step


# ---------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------


def _run_model(seed, x, d_out):
    model = numlstm.LSTM(16, 64, num_layers=2, seed=seed, dtype="float64")
    results = []
    for _ in range(2):
        output, (h_n, c_n) = model(x)
        d_x, (d_h0, d_c0) = model.backward(d_out)
        results += [output, h_n, c_n, d_x, d_h0, d_c0]
    return results + [g.copy() for g in model.grads.values()]


def test_concurrent_models_in_threads_give_the_serial_results():
    rng = np.random.default_rng(11)
    seeds = range(4)
    xs = [inputs(rng, 200, 8, 16) for _ in seeds]
    d_outs = [inputs(rng, 200, 8, 64) for _ in seeds]
    serial = [_run_model(s, xs[s], d_outs[s]) for s in seeds]
    concurrent = [None] * len(seeds)
    errors = []
    barrier = threading.Barrier(len(seeds))

    def work(s):
        try:
            barrier.wait(10)
            concurrent[s] = _run_model(s, xs[s], d_outs[s])
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for s in seeds:
        assert len(concurrent[s]) == len(serial[s])
        for got, expected in zip(concurrent[s], serial[s], strict=True):
            np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(serial[0][0], serial[1][0])  # the models really differ


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------


def test_available_backends_reports_cpu_and_why_cuda_is_missing():
    status = numlstm.available_backends()
    assert set(status) == {"cpu", "cuda"}
    assert isinstance(status["cpu"], numlstm.BackendStatus)
    assert status["cpu"].available is True
    cuda = status["cuda"]
    available, reason = cuda
    if available:  # pragma: no cover - only on a machine with a GPU
        pytest.skip("this machine can run the CUDA backend")
    assert available is False
    assert isinstance(reason, str) and reason.strip()


def test_set_backend_and_get_backend(default_backend):
    assert numlstm.get_backend() == "auto"
    for name in ("cpu", "auto", "cuda"):
        numlstm.set_backend(name)
        assert numlstm.get_backend() == name
    numlstm.set_backend(None)
    assert numlstm.get_backend() == "auto"


def test_process_default_cuda_makes_auto_models_fail_but_not_cpu_models(default_backend):
    if numlstm.available_backends()["cuda"].available:  # pragma: no cover
        pytest.skip("this machine can run the CUDA backend")
    x = np.zeros((3, 1, 3), np.float32)
    auto = numlstm.LSTM(3, 4, seed=0)
    cpu = numlstm.LSTM(3, 4, seed=0, backend="cpu")
    numlstm.set_backend("cuda")
    with pytest.raises(numlstm.BackendUnavailableError, match="cuda"):
        auto(x)
    with pytest.raises(numlstm.BackendUnavailableError, match="cuda"):
        numlstm.forward(x, auto.state_dict())
    cpu(x)  # an explicit backend is not overridden
    numlstm.set_backend("cpu")
    auto(x)


def test_environment_variable_sets_the_default_at_call_time(default_backend, monkeypatch):
    x = np.zeros((3, 1, 3), np.float32)
    model = numlstm.LSTM(3, 4, seed=0)
    monkeypatch.setenv("NUMLSTM_BACKEND", "cpu")
    assert numlstm.get_backend() == "cpu"
    output, _ = model(x)
    assert isinstance(output, np.ndarray)
    if numlstm.available_backends()["cuda"].available:  # pragma: no cover
        return
    monkeypatch.setenv("NUMLSTM_BACKEND", "cuda")  # read at each call, not at import
    assert numlstm.get_backend() == "cuda"
    with pytest.raises(numlstm.BackendUnavailableError):
        model(x)
    numlstm.set_backend("cpu")  # set_backend overrides the variable
    assert numlstm.get_backend() == "cpu"
    model(x)
    numlstm.set_backend(None)
    monkeypatch.setenv("NUMLSTM_BACKEND", "")
    assert numlstm.get_backend() == "auto"


# ---------------------------------------------------------------------------------------
# repr, state_dict copies, live parameters
# ---------------------------------------------------------------------------------------


def test_repr_mentions_sizes_and_options():
    default = repr(numlstm.LSTM(3, 4))
    assert default.startswith("LSTM(3, 4")
    assert "float32" in default and "auto" in default
    full = repr(
        numlstm.LSTM(
            3,
            8,
            num_layers=2,
            bias=False,
            batch_first=True,
            dropout=0.25,
            bidirectional=True,
            proj_size=2,
            dtype="float64",
            backend="cpu",
        )
    )
    for text in (
        "LSTM(3, 8",
        "num_layers=2",
        "bias=False",
        "batch_first=True",
        "dropout=0.25",
        "bidirectional=True",
        "proj_size=2",
        "float64",
        "cpu",
    ):
        assert text in full, (text, full)


def test_state_dict_returns_copies():
    x = np.ones((3, 2, 3))
    model = numlstm.LSTM(3, 4, dtype="float64", seed=0)
    before, _ = model(x)
    state = model.state_dict()
    for value in state.values():
        value[...] = 0.0
    for name, value in model.state_dict().items():
        assert value.any(), name
    np.testing.assert_array_equal(model(x)[0], before)


def test_load_state_dict_copies_its_input():
    x = np.ones((3, 2, 3))
    model = numlstm.LSTM(3, 4, dtype="float64", seed=0)
    state = numlstm.LSTM(3, 4, dtype="float64", seed=1).state_dict()
    model.load_state_dict(state)
    loaded, _ = model(x)
    for value in state.values():
        value[...] = 0.0
    np.testing.assert_array_equal(model(x)[0], loaded)


def test_named_parameters_are_live():
    x = np.ones((3, 2, 3))
    model = numlstm.LSTM(3, 4, dtype="float64", seed=0)
    before, _ = model(x)
    named = dict(model.named_parameters())
    assert list(named) == list(model.state_dict())
    assert all(p is q for p, q in zip(named.values(), model.parameters(), strict=True))
    named["weight_ih_l0"] *= 2.0
    np.testing.assert_array_equal(model.state_dict()["weight_ih_l0"], named["weight_ih_l0"])
    after, _ = model(x)
    assert not np.allclose(after, before)
    expected, _ = lstm_forward(x, model.state_dict())
    assert_close(after, expected, name="output")


# ---------------------------------------------------------------------------------------
# batch_first
# ---------------------------------------------------------------------------------------


def test_batch_first_model_equals_the_time_major_model_transposed():
    rng = np.random.default_rng(12)
    kw = dict(
        input_size=3,
        hidden_size=5,
        num_layers=2,
        bidirectional=True,
        proj_size=2,
        dtype="float64",
        seed=0,
    )
    time_major = numlstm.LSTM(**kw)
    batch_first = numlstm.LSTM(**kw, batch_first=True)
    steps, batch = 6, 3
    x = inputs(rng, steps, batch, 3)
    h0 = rng.standard_normal((4, batch, 2))
    c0 = rng.standard_normal((4, batch, 5))
    lengths = [6, 2, 4]
    out_t, (h_t, c_t) = time_major(x, (h0, c0), lengths)
    out_b, (h_b, c_b) = batch_first(x.transpose(1, 0, 2), (h0, c0), lengths)
    assert out_b.shape == (batch, steps, 4)
    assert h_b.shape == (4, batch, 2) and c_b.shape == (4, batch, 5)
    np.testing.assert_array_equal(out_b, out_t.transpose(1, 0, 2))
    np.testing.assert_array_equal(h_b, h_t)
    np.testing.assert_array_equal(c_b, c_t)
    d_out = rng.standard_normal(out_t.shape)
    d_x_t, (d_h0_t, d_c0_t) = time_major.backward(d_out)
    d_x_b, (d_h0_b, d_c0_b) = batch_first.backward(d_out.transpose(1, 0, 2))
    assert d_x_b.shape == (batch, steps, 3)
    np.testing.assert_array_equal(d_x_b, d_x_t.transpose(1, 0, 2))
    np.testing.assert_array_equal(d_h0_b, d_h0_t)
    np.testing.assert_array_equal(d_c0_b, d_c0_t)
    for name, grad in time_major.grads.items():
        np.testing.assert_array_equal(batch_first.grads[name], grad, err_msg=name)
    expected, _ = lstm_forward(
        x.transpose(1, 0, 2), time_major.state_dict(), (h0, c0), lengths, batch_first=True
    )
    assert_close(out_b, expected, name="output")


@pytest.mark.parametrize("num_layers", [1, 2])
def test_returned_states_are_arrays_of_their_own(num_layers):
    """Writing into the h_n, c_n that forward returned changes nothing its tape keeps: the
    gradients stay those of an untouched forward pass."""
    spec = numlstm.LSTMSpec(input_size=3, hidden_size=4, num_layers=num_layers, dtype="float64")
    params = spec.init_params(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((5, 2, 3))
    output, _, tape = numlstm.forward(x, params)
    d_output = np.ones_like(output)
    d_x, (d_h0, d_c0), grads = numlstm.backward(tape, d_output)
    _, (h_n, c_n), tape = numlstm.forward(x, params)
    h_n[...] = np.nan
    c_n[...] = np.nan
    d_x_again, (d_h0_again, d_c0_again), grads_again = numlstm.backward(tape, d_output)
    np.testing.assert_array_equal(d_x_again, d_x)
    np.testing.assert_array_equal(d_h0_again, d_h0)
    np.testing.assert_array_equal(d_c0_again, d_c0)
    for name, grad in grads.items():
        np.testing.assert_array_equal(grads_again[name], grad, err_msg=name)
