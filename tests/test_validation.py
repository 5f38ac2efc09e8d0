"""Every bad input gets a clear error, and no error changes the model.

DESIGN.md §2: arrays of another dtype, wrong shapes, lengths out of range, an unknown
backend give a ``TypeError``/``ValueError`` that names the argument, what was expected and
what was given; nothing is cast silently and nothing crashes the process. Each case below
asserts the exception type and a message naming the argument and the value, shape or
dtype that was given. A failed call must leave the model as it was: parameters, gradients,
the saved tape of the last good forward (so that ``backward`` still gives the same result)
and the dropout generator (so that the next forward draws the same masks).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import assert_close
from reference import init_params, lstm_forward

import numlstm

T, B, IN, H, P = 5, 2, 3, 4, 2  # steps, batch, input, hidden, projection
L, D = 2, 2  # two layers, bidirectional
N = L * D  # rows of h0 / c0
F = D * P  # features of the output

#: The model most cases run against: every option that adds a shape rule is on.
MODEL_KW = dict(
    input_size=IN,
    hidden_size=H,
    num_layers=L,
    dropout=0.5,
    bidirectional=True,
    proj_size=P,
    dtype="float64",
)

RNG = np.random.default_rng(1234)
X = RNG.standard_normal((T, B, IN))
H0 = RNG.standard_normal((N, B, P))
C0 = RNG.standard_normal((N, B, H))
LENGTHS = [T, 3]
D_OUT = RNG.standard_normal((T, B, F))
D_HN = RNG.standard_normal((N, B, P))
D_CN = RNG.standard_normal((N, B, H))


def f64(*shape):
    return np.zeros(shape, np.float64)


def raises(exc, pattern):
    """``pytest.raises`` whose message must match ``pattern`` (searched, DOTALL)."""
    return pytest.raises(exc, match=re.compile(pattern, re.DOTALL))


def make_model(seed=0):
    return numlstm.LSTM(**MODEL_KW, seed=seed)


def good_step(model):
    """A good forward and backward: leaves a tape and non-zero grads."""
    model(X, (H0, C0), LENGTHS)
    return model.backward(D_OUT, (D_HN, D_CN))


@pytest.fixture
def twins():
    """Two identical models after the same good step; the first one meets the bad input."""
    model, twin = make_model(), make_model()
    good_step(model)
    good_step(twin)
    return model, twin


def assert_same_model(model, twin):
    """``model`` behaves exactly as ``twin``, which never saw the bad call."""
    assert list(model.state_dict()) == list(twin.state_dict())
    for name, value in twin.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)
    for name, value in twin.grads.items():
        np.testing.assert_array_equal(model.grads[name], value, err_msg=f"grads[{name}]")
    # The tape of the last good forward is still there, and gives the same gradients.
    d_x, (d_h0, d_c0) = model.backward(D_OUT)
    d_x_twin, (d_h0_twin, d_c0_twin) = twin.backward(D_OUT)
    np.testing.assert_array_equal(d_x, d_x_twin)
    np.testing.assert_array_equal(d_h0, d_h0_twin)
    np.testing.assert_array_equal(d_c0, d_c0_twin)
    for name, value in twin.grads.items():
        np.testing.assert_array_equal(model.grads[name], value, err_msg=f"grads[{name}]")
    # The dropout generator did not move: the next training forward draws the same masks.
    out, (h_n, c_n) = model(X)
    out_twin, (h_n_twin, c_n_twin) = twin(X)
    np.testing.assert_array_equal(out, out_twin)
    np.testing.assert_array_equal(h_n, h_n_twin)
    np.testing.assert_array_equal(c_n, c_n_twin)


# ---------------------------------------------------------------------------------------
# Bad forward inputs: (id, x, hx, lengths, exception, message pattern). The pattern names
# the argument and the value, shape or dtype that was given.
# ---------------------------------------------------------------------------------------

FORWARD_CASES = [
    # x: dimensions and features
    ("x-1d", f64(IN), None, None, ValueError, r"\bx\b.*\(3,\)"),
    ("x-4d", f64(T, B, 1, IN), None, None, ValueError, r"\bx\b.*\(5, 2, 1, 3\)"),
    ("x-features", f64(T, B, IN + 2), None, None, ValueError, r"\bx\b.*input_size.*\(5, 2, 5\)"),
    ("x-no-steps", f64(0, B, IN), None, None, ValueError, r"\bx\b.*\(0, 2, 3\)"),
    ("x-no-batch", f64(T, 0, IN), None, None, ValueError, r"\bx\b.*\(5, 0, 3\)"),
    # x: dtypes (nothing is cast silently)
    ("x-int", np.zeros((T, B, IN), np.int64), None, None, TypeError, r"\bx\b.*float64.*int64"),
    ("x-bool", np.zeros((T, B, IN), bool), None, None, TypeError, r"\bx\b.*float64.*bool"),
    ("x-float16", np.zeros((T, B, IN), np.float16), None, None, TypeError, r"\bx\b.*float16"),
    ("x-float32", np.zeros((T, B, IN), np.float32), None, None, TypeError, r"\bx\b.*float32"),
    # x: not an array
    ("x-list", X.tolist(), None, None, TypeError, r"\bx\b.*array.*got list"),
    ("x-tuple", tuple(X.tolist()), None, None, TypeError, r"\bx\b.*array.*got tuple"),
    ("x-scalar", 1.5, None, None, TypeError, r"\bx\b.*array.*got float"),
    ("x-numpy-scalar", np.float64(1.5), None, None, TypeError, r"\bx\b.*array.*got float64"),
    ("x-None", None, None, None, TypeError, r"\bx\b.*array.*got NoneType"),
    ("x-str", "abc", None, None, TypeError, r"\bx\b.*array.*got str"),
    ("x-dict", {"x": X}, None, None, TypeError, r"\bx\b.*array.*got dict"),
    # lengths
    ("lengths-above-T", X, None, [T + 1, 2], ValueError, r"lengths.*\[1, 5\].*= 6"),
    ("lengths-zero", X, None, [3, 0], ValueError, r"lengths.*\[1, 5\].*lengths\[1\] = 0"),
    ("lengths-negative", X, None, [-2, 3], ValueError, r"lengths.*\[1, 5\].*= -2"),
    ("lengths-too-few", X, None, [3], ValueError, r"lengths.*2 expected, got 1"),
    ("lengths-too-many", X, None, [3, 3, 3], ValueError, r"lengths.*2 expected, got 3"),
    ("lengths-float", X, None, [3.0, 2.0], TypeError, r"lengths.*integers.*float64"),
    ("lengths-float-array", X, None, np.array([3.5, 2.0]), TypeError, r"lengths.*float64"),
    ("lengths-bool", X, None, [True, True], TypeError, r"lengths.*integers.*bool"),
    ("lengths-str", X, None, ["3", "2"], TypeError, r"lengths.*integers.*<U1"),
    ("lengths-None-entry", X, None, [3, None], TypeError, r"lengths.*integers.*object"),
    ("lengths-2d", X, None, [[3, 2]], ValueError, r"lengths.*1-D.*\(1, 2\)"),
    ("lengths-scalar", X, None, 3, ValueError, r"lengths.*1-D.*\(\)"),
    ("lengths-ragged", X, None, [3, [2]], ValueError, r"lengths.*1-D"),
    ("lengths-unbatched", X[:, 0], None, [3], ValueError, r"lengths.*unbatched.*\(5, 3\)"),
    # hx
    ("hx-array", X, f64(N, B, P), None, TypeError, r"\bhx\b.*tuple.*got ndarray"),
    ("hx-dict", X, {"h0": H0, "c0": C0}, None, TypeError, r"\bhx\b.*tuple.*got dict"),
    ("hx-one", X, (H0,), None, TypeError, r"\bhx\b.*tuple of two.*length 1"),
    ("hx-three", X, (H0, C0, C0), None, TypeError, r"\bhx\b.*tuple of two.*length 3"),
    ("h0-rows", X, (f64(N - 1, B, P), C0), None, ValueError, r"\bh0\b.*\(4, 2, 2\).*\(3, 2, 2\)"),
    ("h0-batch", X, (f64(N, B + 1, P), C0), None, ValueError, r"\bh0\b.*\(4, 2, 2\).*\(4, 3, 2\)"),
    ("h0-hidden", X, (f64(N, B, H), C0), None, ValueError, r"\bh0\b.*\(4, 2, 2\).*\(4, 2, 4\)"),
    ("c0-rows", X, (H0, f64(1, B, H)), None, ValueError, r"\bc0\b.*\(4, 2, 4\).*\(1, 2, 4\)"),
    ("c0-batch", X, (H0, f64(N, 1, H)), None, ValueError, r"\bc0\b.*\(4, 2, 4\).*\(4, 1, 4\)"),
    ("c0-proj", X, (H0, f64(N, B, P)), None, ValueError, r"\bc0\b.*hidden_size.*\(4, 2, 2\)"),
    ("h0-float32", X, (H0.astype(np.float32), C0), None, TypeError, r"\bh0\b.*float64.*float32"),
    ("c0-int", X, (H0, C0.astype(np.int32)), None, TypeError, r"\bc0\b.*float64.*int32"),
    ("h0-list", X, (H0.tolist(), C0), None, TypeError, r"\bh0\b.*array.*got list"),
    ("c0-None", X, (H0, None), None, TypeError, r"\bc0\b.*array.*got NoneType"),
    (
        "hx-batched-unbatched-x",
        X[:, 0],
        (H0, C0),
        None,
        ValueError,
        r"\bh0\b.*\(4, 2\).*\(4, 2, 2\)",
    ),
]
FORWARD_IDS = [case[0] for case in FORWARD_CASES]


@pytest.mark.parametrize(
    ("x", "hx", "lengths", "exc", "pattern"),
    [case[1:] for case in FORWARD_CASES],
    ids=FORWARD_IDS,
)
def test_bad_forward_input_raises_and_leaves_the_model_unchanged(
    twins, x, hx, lengths, exc, pattern
):
    model, twin = twins
    with raises(exc, pattern):
        model(x, hx, lengths)
    assert_same_model(model, twin)


@pytest.mark.parametrize(
    ("x", "hx", "lengths", "exc", "pattern"),
    [case[1:] for case in FORWARD_CASES],
    ids=FORWARD_IDS,
)
def test_bad_forward_input_raises_in_the_functional_layer(x, hx, lengths, exc, pattern):
    params = make_model().state_dict()
    before = {name: value.copy() for name, value in params.items()}
    with raises(exc, pattern):
        numlstm.forward(x, params, hx, lengths)
    for name, value in before.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)


def test_float32_input_into_a_float64_model_names_both_dtypes():
    model = numlstm.LSTM(IN, H, dtype="float64", seed=0)
    with raises(TypeError, r"\bx\b.*model's dtype float64.*float32"):
        model(X.astype(np.float32))


def test_float64_input_into_a_float32_model_names_both_dtypes():
    model = numlstm.LSTM(IN, H, seed=0)
    with raises(TypeError, r"\bx\b.*model's dtype float32.*float64"):
        model(X)


def test_float16_input_is_not_told_to_build_a_float16_model():
    """The fix offered for a float16 array must be one numlstm supports."""
    model = numlstm.LSTM(IN, H, seed=0)
    with pytest.raises(TypeError, match=r"\bx\b.*float16") as info:
        model(X.astype(np.float16))
    message = str(info.value)
    assert "float32" in message
    assert "dtype='float16'" not in message, message


def test_bad_batch_first_input_names_the_batch_first_layout():
    model = numlstm.LSTM(IN, H, batch_first=True, dtype="float64", seed=0)
    with raises(ValueError, r"\bx\b.*\(B, T, I\).*\(5, 2, 1, 3\)"):
        model(f64(T, B, 1, IN))
    with raises(ValueError, r"\bh0\b.*\(1, 5, 4\).*\(1, 2, 4\)"):
        model(X, (f64(1, B, H), f64(1, B, H)))  # states keep (L*D, B, .) with batch_first


# ---------------------------------------------------------------------------------------
# Bad backward inputs
# ---------------------------------------------------------------------------------------

BACKWARD_CASES = [
    ("d_output-shape", f64(T, B, F + 1), None, ValueError, r"d_output.*\(5, 2, 4\).*\(5, 2, 5\)"),
    ("d_output-batch-first", f64(B, T, F), None, ValueError, r"d_output.*\(5, 2, 4\).*\(2, 5, 4\)"),
    ("d_output-float32", D_OUT.astype(np.float32), None, TypeError, r"d_output.*float64.*float32"),
    ("d_output-int", np.zeros((T, B, F), int), None, TypeError, r"d_output.*float64.*int"),
    ("d_output-list", D_OUT.tolist(), None, TypeError, r"d_output.*array.*got list"),
    ("d_output-scalar", 1.0, None, TypeError, r"d_output.*array.*got float"),
    ("d_hx-array", D_OUT, f64(N, B, P), TypeError, r"d_hx.*tuple.*got ndarray"),
    ("d_hx-one", D_OUT, (D_HN,), TypeError, r"d_hx.*tuple of two.*length 1"),
    ("d_h_n-rows", D_OUT, (f64(1, B, P), D_CN), ValueError, r"d_h_n.*\(4, 2, 2\).*\(1, 2, 2\)"),
    ("d_h_n-batch", D_OUT, (f64(N, 3, P), D_CN), ValueError, r"d_h_n.*\(4, 2, 2\).*\(4, 3, 2\)"),
    ("d_h_n-hidden", D_OUT, (f64(N, B, H), D_CN), ValueError, r"d_h_n.*\(4, 2, 2\).*\(4, 2, 4\)"),
    ("d_c_n-proj", D_OUT, (D_HN, f64(N, B, P)), ValueError, r"d_c_n.*\(4, 2, 4\).*\(4, 2, 2\)"),
    ("d_c_n-float32", D_OUT, (D_HN, D_CN.astype(np.float32)), TypeError, r"d_c_n.*float32"),
    ("d_c_n-list", D_OUT, (D_HN, D_CN.tolist()), TypeError, r"d_c_n.*array.*got list"),
]
BACKWARD_IDS = [case[0] for case in BACKWARD_CASES]


@pytest.mark.parametrize(
    ("d_output", "d_hx", "exc", "pattern"), [case[1:] for case in BACKWARD_CASES], ids=BACKWARD_IDS
)
def test_bad_backward_input_raises_and_leaves_the_model_unchanged(
    twins, d_output, d_hx, exc, pattern
):
    model, twin = twins
    with raises(exc, pattern):
        model.backward(d_output, d_hx)
    assert_same_model(model, twin)


@pytest.mark.parametrize(
    ("d_output", "d_hx", "exc", "pattern"), [case[1:] for case in BACKWARD_CASES], ids=BACKWARD_IDS
)
def test_bad_backward_input_raises_in_the_functional_layer(d_output, d_hx, exc, pattern):
    params = make_model().state_dict()
    _, _, tape = numlstm.forward(X, params, (H0, C0), LENGTHS)
    with raises(exc, pattern):
        numlstm.backward(tape, d_output, d_hx)
    # The tape is still good: the backward of the same pass still runs.
    d_x, _, grads = numlstm.backward(tape, D_OUT)
    assert d_x.shape == X.shape
    assert all(np.isfinite(g).all() for g in grads.values())


def test_functional_backward_rejects_something_that_is_not_a_tape():
    with raises(TypeError, r"tape.*Tape.*got dict"):
        numlstm.backward({}, D_OUT)


def test_backward_before_any_forward_raises():
    model = make_model()
    with raises(ValueError, r"backward.*forward"):
        model.backward(D_OUT)
    assert all(not g.any() for g in model.grads.values())


def test_backward_after_a_forward_under_no_grad_raises():
    model = make_model()
    with numlstm.no_grad():
        model(X)
    with raises(ValueError, r"backward.*forward.*no_grad"):
        model.backward(D_OUT)
    assert all(not g.any() for g in model.grads.values())


def test_backward_after_a_failed_load_state_dict_still_uses_the_tape(twins):
    model, twin = twins
    with pytest.raises(ValueError):
        model.load_state_dict({})
    assert_same_model(model, twin)


# ---------------------------------------------------------------------------------------
# Constructor arguments
# ---------------------------------------------------------------------------------------

CONSTRUCTOR_CASES = [
    # backend
    ("backend-gpu", dict(backend="gpu"), ValueError, r"backend.*'cpu'.*got 'gpu'"),
    ("backend-int", dict(backend=3), TypeError, r"backend.*'cpu'.*got 3"),
    ("backend-None", dict(backend=None), TypeError, r"backend.*'cpu'.*got None"),
    # dtype
    ("dtype-float16", dict(dtype="float16"), ValueError, r"dtype.*'float32'.*'float16'"),
    ("dtype-int32", dict(dtype="int32"), ValueError, r"dtype.*'float32'.*'int32'"),
    ("dtype-foo", dict(dtype="foo"), ValueError, r"dtype.*'float32'.*'foo'"),
    ("dtype-np-int64", dict(dtype=np.int64), ValueError, r"dtype.*'float32'.*int64"),
    ("dtype-big-endian", dict(dtype=">f4"), ValueError, r"dtype.*'float32'.*'>f4'"),
    ("dtype-list", dict(dtype=[1, 2]), ValueError, r"dtype.*'float32'.*\[1, 2\]"),
    ("dtype-None", dict(dtype=None), ValueError, r"dtype.*'float32'.*None"),
    # sizes
    ("input_size-0", dict(input_size=0), ValueError, r"input_size.*>= 1.*got 0"),
    ("hidden_size-negative", dict(hidden_size=-1), ValueError, r"hidden_size.*>= 1.*got -1"),
    ("num_layers-0", dict(num_layers=0), ValueError, r"num_layers.*>= 1.*got 0"),
    ("hidden_size-float", dict(hidden_size=2.5), TypeError, r"hidden_size.*integer.*2\.5"),
    ("hidden_size-integral-float", dict(hidden_size=4.0), TypeError, r"hidden_size.*4\.0"),
    ("input_size-True", dict(input_size=True), TypeError, r"input_size.*integer.*True"),
    ("num_layers-str", dict(num_layers="2"), TypeError, r"num_layers.*integer.*'2'"),
    ("proj_size-equal", dict(proj_size=4), ValueError, r"proj_size.*hidden_size.*4.*got 4"),
    ("proj_size-above", dict(proj_size=9), ValueError, r"proj_size.*hidden_size.*4.*got 9"),
    ("proj_size-negative", dict(proj_size=-1), ValueError, r"proj_size.*>= 0.*got -1"),
    # dropout
    ("dropout-above", dict(dropout=1.5), ValueError, r"dropout.*\[0, 1\].*1\.5"),
    ("dropout-negative", dict(dropout=-0.1), ValueError, r"dropout.*\[0, 1\].*-0\.1"),
    ("dropout-nan", dict(dropout=float("nan")), ValueError, r"dropout.*\[0, 1\].*nan"),
    ("dropout-str", dict(dropout="0.5"), TypeError, r"dropout.*number.*'0\.5'"),
    ("dropout-None", dict(dropout=None), TypeError, r"dropout.*number.*None"),
    ("dropout-bool", dict(dropout=True), TypeError, r"dropout.*number.*True"),
    # flags
    ("batch_first-int", dict(batch_first=1), TypeError, r"batch_first.*True or False.*got 1"),
    ("bidirectional-str", dict(bidirectional="yes"), TypeError, r"bidirectional.*'yes'"),
    ("bias-None", dict(bias=None), TypeError, r"bias.*True or False.*got None"),
    # seed
    ("seed-negative", dict(seed=-1), ValueError, r"seed.*>= 0.*-1"),
    ("seed-float", dict(seed=1.5), TypeError, r"seed.*integer.*1\.5"),
    ("seed-str", dict(seed="0"), TypeError, r"seed.*integer.*'0'"),
    ("seed-bool", dict(seed=True), TypeError, r"seed.*integer.*True"),
]


@pytest.mark.parametrize(
    ("changes", "exc", "pattern"),
    [case[1:] for case in CONSTRUCTOR_CASES],
    ids=[case[0] for case in CONSTRUCTOR_CASES],
)
def test_bad_constructor_argument_raises(changes, exc, pattern):
    kwargs = dict(input_size=IN, hidden_size=H, num_layers=2) | changes
    with raises(exc, pattern):
        numlstm.LSTM(**kwargs)


@pytest.mark.parametrize("mode", [1, "eval", None])
def test_train_mode_must_be_a_bool(twins, mode):
    model, twin = twins
    with raises(TypeError, rf"mode.*True or False.*{re.escape(repr(mode))}"):
        model.train(mode)
    assert model.training is True
    assert_same_model(model, twin)


# ---------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------


def _without(name):
    state = make_model(seed=7).state_dict()
    del state[name]
    return state


def _with(name, value):
    state = make_model(seed=7).state_dict()
    state[name] = value
    return state


STATE_DICT_CASES = [
    (
        "missing-key",
        lambda: _without("bias_hh_l1_reverse"),
        ValueError,
        r"state_dict.*missing keys \['bias_hh_l1_reverse'\]",
    ),
    (
        "unexpected-key",
        lambda: _with("weight_ih_l2", f64(4 * H, F)),
        ValueError,
        r"state_dict.*unexpected keys \['weight_ih_l2'\]",
    ),
    (
        "wrong-shape",
        lambda: _with("weight_ih_l0", f64(IN, 4 * H)),
        ValueError,
        r"state_dict\['weight_ih_l0'\].*\(16, 3\).*\(3, 16\)",
    ),
    (
        "wrong-shape-proj",
        lambda: _with("weight_hr_l1", f64(H, P)),
        ValueError,
        r"state_dict\['weight_hr_l1'\].*\(2, 4\).*\(4, 2\)",
    ),
    (
        "wrong-dtype",
        lambda: _with("weight_hh_l0", np.zeros((4 * H, P), np.float32)),
        TypeError,
        r"state_dict\['weight_hh_l0'\].*float64.*float32",
    ),
    (
        "list-value",
        lambda: _with("bias_ih_l0", [0.0] * (4 * H)),
        TypeError,
        r"state_dict\['bias_ih_l0'\].*array.*got list",
    ),
    (
        "not-a-dict",
        lambda: list(make_model(seed=7).state_dict().items()),
        TypeError,
        r"state_dict.*dict.*got list",
    ),
    ("None", lambda: None, TypeError, r"state_dict.*dict.*got NoneType"),
]


@pytest.mark.parametrize(
    ("build", "exc", "pattern"),
    [case[1:] for case in STATE_DICT_CASES],
    ids=[case[0] for case in STATE_DICT_CASES],
)
def test_bad_state_dict_raises_and_leaves_the_model_unchanged(twins, build, exc, pattern):
    model, twin = twins
    with raises(exc, pattern):
        model.load_state_dict(build())
    assert_same_model(model, twin)


def test_torch_tensor_in_state_dict_hints_at_numpy():
    torch = pytest.importorskip("torch")
    model, twin = make_model(), make_model()
    good_step(model)
    good_step(twin)
    state = {k: torch.from_numpy(v) for k, v in make_model(seed=7).state_dict().items()}
    with raises(TypeError, r"state_dict\['weight_ih_l0'\].*got Tensor.*\.numpy\(\)"):
        model.load_state_dict(state)
    assert_same_model(model, twin)


def test_a_state_dict_bad_in_its_last_key_loads_nothing(twins):
    """The check is atomic: the good keys before the bad one are not loaded either."""
    model, twin = twins
    state = make_model(seed=7).state_dict()
    last = list(state)[-1]
    state[last] = state[last].astype(np.float32)
    with raises(TypeError, rf"state_dict\['{last}'\].*float32"):
        model.load_state_dict(state)
    assert_same_model(model, twin)


# ---------------------------------------------------------------------------------------
# The functional layer's own arguments: params, dropout masks, options
# ---------------------------------------------------------------------------------------


def _params(**changes):
    params = init_params(np.random.default_rng(0), IN, H, L, True, P)
    for name, value in changes.items():
        if value is None:
            del params[name]
        else:
            params[name] = value
    return params


def _without_reverse_of_layer_1():
    return {k: v for k, v in _params().items() if not k.endswith("_l1_reverse")}


PARAMS_CASES = [
    (
        "missing-reverse-layer-1",
        _without_reverse_of_layer_1,
        ValueError,
        r"params.*missing keys \['weight_ih_l1_reverse', 'weight_hh_l1_reverse'",
    ),
    (
        "missing-weight_ih_l0",
        lambda: _params(weight_ih_l0=None),
        ValueError,
        r"params.*'weight_ih_l0'",
    ),
    (
        "weight_hh-rows-not-4H",
        lambda: _params(weight_hh_l0=f64(4 * H - 1, P)),
        ValueError,
        r"params\['weight_hh_l0'\].*4 \* hidden_size.*\(15, 2\)",
    ),
    (
        "weight_hh-layer-1-wrong-shape",
        lambda: _params(weight_hh_l1=f64(4 * H, H)),
        ValueError,
        r"params\['weight_hh_l1'\].*\(16, 2\).*\(16, 4\)",
    ),
    (
        "int-weights",
        lambda: {k: v.astype(np.int64) for k, v in _params().items()},
        TypeError,
        r"params\['weight_ih_l0'\].*float32 or float64.*int64",
    ),
    (
        "one-int-weight",
        lambda: _params(bias_hh_l1=np.zeros(4 * H, np.int64)),
        TypeError,
        r"params\['bias_hh_l1'\].*float64.*int64",
    ),
    (
        "mixed-dtypes",
        lambda: _params(weight_hh_l0=np.zeros((4 * H, P), np.float32)),
        TypeError,
        r"params\['weight_hh_l0'\].*float64.*float32",
    ),
    (
        "weight_ih-1d",
        lambda: _params(weight_ih_l0=f64(4 * H)),
        ValueError,
        r"params\['weight_ih_l0'\].*2-D.*\(16,\)",
    ),
    (
        "weight_ih-list",
        lambda: _params(weight_ih_l0=f64(4 * H, IN).tolist()),
        TypeError,
        r"params\['weight_ih_l0'\].*got list",
    ),
    ("not-a-dict", lambda: list(_params().values()), TypeError, r"params.*dict.*got list"),
]


@pytest.mark.parametrize(
    ("build", "exc", "pattern"),
    [case[1:] for case in PARAMS_CASES],
    ids=[case[0] for case in PARAMS_CASES],
)
def test_inconsistent_params_raise_in_the_functional_forward(build, exc, pattern):
    with raises(exc, pattern):
        numlstm.forward(X, build())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_tensors_as_functional_params_name_their_dtype_and_hint_at_numpy(dtype):
    """The message must not claim a dtype the tensors do not have."""
    torch = pytest.importorskip("torch")
    params = {k: torch.from_numpy(v.astype(dtype)) for k, v in _params().items()}
    with pytest.raises(TypeError, match=r"params\['weight_ih_l0'\].*Tensor.*\.numpy\(\)") as info:
        numlstm.forward(X.astype(dtype), params)
    other = "float64" if dtype == np.float32 else "float32"
    assert other not in str(info.value), str(info.value)


MASK_SHAPE = (T, B, F)
MASK_CASES = [
    ("none-for-two-layers", [], ValueError, r"dropout_masks.*num_layers - 1 = 1.*length 0"),
    (
        "two-for-two-layers",
        [np.ones(MASK_SHAPE)] * 2,
        ValueError,
        r"dropout_masks.*num_layers - 1 = 1.*length 2",
    ),
    ("an-array", np.ones((1, *MASK_SHAPE)), ValueError, r"dropout_masks.*list.*got ndarray"),
    ("a-number", 0.5, ValueError, r"dropout_masks.*list.*got float"),
    (
        "wrong-steps",
        [np.ones((T - 1, B, F))],
        ValueError,
        r"dropout_masks\[0\].*\(5, 2, 4\).*\(4, 2, 4\)",
    ),
    (
        "float32-mask",
        [np.ones(MASK_SHAPE, np.float32)],
        TypeError,
        r"dropout_masks\[0\].*float64.*float32",
    ),
    ("list-mask", [np.ones(MASK_SHAPE).tolist()], TypeError, r"dropout_masks\[0\].*got list"),
]


@pytest.mark.parametrize(
    ("masks", "exc", "pattern"),
    [case[1:] for case in MASK_CASES],
    ids=[case[0] for case in MASK_CASES],
)
def test_bad_dropout_masks_raise(masks, exc, pattern):
    with raises(exc, pattern):
        numlstm.forward(X, _params(), dropout_masks=masks)


def test_dropout_masks_of_the_wrong_width_name_the_expected_width():
    params = init_params(np.random.default_rng(0), IN, 5, 2, False, 0)
    with raises(ValueError, r"dropout_masks\[0\].*\(5, 2, 5\).*\(5, 2, 3\)"):
        numlstm.forward(X, params, dropout_masks=[np.ones((T, B, 3))])


def test_dropout_masks_follow_the_batch_first_layout():
    params = _params()
    x_bf = np.ascontiguousarray(X.transpose(1, 0, 2))
    with raises(ValueError, r"dropout_masks\[0\].*\(2, 5, 4\).*\(5, 2, 4\)"):
        numlstm.forward(x_bf, params, batch_first=True, dropout_masks=[np.ones(MASK_SHAPE)])


@pytest.mark.parametrize(
    ("options", "exc", "pattern"),
    [
        (dict(batch_first=1), TypeError, r"batch_first.*True or False.*got 1"),
        (dict(dropout=2.0), ValueError, r"dropout.*\[0, 1\].*2\.0"),
        (dict(dropout="x"), TypeError, r"dropout.*number.*'x'"),
        (dict(backend="gpu"), ValueError, r"backend.*got 'gpu'"),
        (dict(backend=None), TypeError, r"backend.*got None"),
    ],
    ids=["batch_first", "dropout-range", "dropout-type", "backend-name", "backend-None"],
)
def test_bad_functional_options_raise(options, exc, pattern):
    with raises(exc, pattern):
        numlstm.forward(X, _params(), **options)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


def _cuda_missing():
    status = numlstm.available_backends()["cuda"]
    if status.available:  # pragma: no cover - only on a machine with a GPU
        pytest.skip("this machine can run the CUDA backend")
    return status.reason


def test_cuda_backend_without_a_gpu_is_one_clear_error(default_backend):
    reason = _cuda_missing()
    assert issubclass(numlstm.BackendUnavailableError, RuntimeError)
    with pytest.raises(numlstm.BackendUnavailableError) as info:
        numlstm.LSTM(IN, H, backend="cuda")
    message = str(info.value)
    assert "'cuda'" in message and reason in message, message
    with raises(numlstm.BackendUnavailableError, re.escape(reason)):
        numlstm.forward(X, _params(), backend="cuda")


def test_cuda_as_process_default_is_one_clear_error_at_the_call(default_backend, twins):
    reason = _cuda_missing()
    model, twin = twins
    numlstm.set_backend("cuda")
    with raises(numlstm.BackendUnavailableError, r"'cuda'.*" + re.escape(reason)):
        model(X)
    numlstm.set_backend(None)
    assert_same_model(model, twin)


def test_set_backend_rejects_an_unknown_name_and_keeps_the_default(default_backend):
    numlstm.set_backend("cpu")
    with raises(ValueError, r"backend.*got 'gpu'"):
        numlstm.set_backend("gpu")
    with raises(TypeError, r"backend.*got 0"):
        numlstm.set_backend(0)
    assert numlstm.get_backend() == "cpu"


def test_garbage_in_the_environment_variable_is_a_clear_error(default_backend, monkeypatch, twins):
    model, twin = twins
    monkeypatch.setenv("NUMLSTM_BACKEND", "garbage")
    with raises(ValueError, r"NUMLSTM_BACKEND.*'cpu'.*got 'garbage'"):
        numlstm.get_backend()
    with raises(ValueError, r"NUMLSTM_BACKEND.*got 'garbage'"):
        model(X)
    with raises(ValueError, r"NUMLSTM_BACKEND.*got 'garbage'"):
        numlstm.forward(X, _params())
    monkeypatch.delenv("NUMLSTM_BACKEND")
    assert numlstm.get_backend() == "auto"
    assert_same_model(model, twin)


# ---------------------------------------------------------------------------------------
# No error path reaches a kernel: after every bad call, good calls give the oracle's result
# ---------------------------------------------------------------------------------------


def test_after_every_bad_call_the_model_still_computes_the_reference_result():
    model = make_model()
    model.eval()  # no dropout: compare with the oracle directly
    params = model.state_dict()
    for _, x, hx, lengths, exc, _ in FORWARD_CASES:
        with pytest.raises(exc):
            model(x, hx, lengths)
    model(X, (H0, C0), LENGTHS)
    for _, d_output, d_hx, exc, _ in BACKWARD_CASES:
        with pytest.raises(exc):
            model.backward(d_output, d_hx)
    for _, build, exc, _ in STATE_DICT_CASES:
        with pytest.raises(exc):
            model.load_state_dict(build())
    for _, masks, exc, _ in MASK_CASES:
        with pytest.raises(exc):
            numlstm.forward(X, params, dropout_masks=masks)
    output, (h_n, c_n) = model(X, (H0, C0), LENGTHS)
    expected, (h_ref, c_ref) = lstm_forward(X, params, (H0, C0), LENGTHS)
    assert_close(output, expected, name="output")
    assert_close(h_n, h_ref, name="h_n")
    assert_close(c_n, c_ref, name="c_n")
    d_x, _ = model.backward(D_OUT)
    assert np.isfinite(d_x).all()
