"""Tests of the oracle itself: ``tests/reference.py`` against ``torch.nn.LSTM`` in float64.

Every other test of numlstm trusts ``reference.lstm_forward``; this module is why. It skips
as a whole when torch is not installed.
"""

import numpy as np
import pytest

try:
    from reference import infer_config, init_params, lstm_forward, param_names
except ImportError:  # tests/ imported as a package
    from tests.reference import infer_config, init_params, lstm_forward, param_names

torch = pytest.importorskip("torch")
rnn_utils = pytest.importorskip("torch.nn.utils.rnn")

RTOL = ATOL = 1e-12

T, B, INPUT_SIZE, HIDDEN_SIZE = 5, 4, 3, 4
LENGTHS = [3, 5, 1, 4]  # unsorted, with a length-1 and a full-length sequence

# (num_layers, bidirectional, proj_size, bias)
CONFIGS = {
    "single": (1, False, 0, True),
    "two_layers": (2, False, 0, True),
    "three_layers": (3, False, 0, True),
    "bidirectional": (1, True, 0, True),
    "projection": (1, False, 2, True),
    "no_bias": (1, False, 0, False),
    "bi_proj_2layers": (2, True, 2, True),
    "bi_proj_3layers_no_bias": (3, True, 3, False),
}
MULTI_LAYER = {name: c for name, c in CONFIGS.items() if c[0] > 1}


def config_params(config, seed=0):
    num_layers, bidirectional, proj_size, bias = config
    rng = np.random.default_rng(seed)
    params = init_params(
        rng, INPUT_SIZE, HIDDEN_SIZE, num_layers, bidirectional, proj_size, bias=bias
    )
    return params, rng


def random_hx(rng, params, batch=B):
    cfg = infer_config(params)
    rows = cfg.num_layers * cfg.num_directions
    batch_shape = () if batch is None else (batch,)
    h0 = rng.standard_normal((rows, *batch_shape, cfg.output_size))
    c0 = rng.standard_normal((rows, *batch_shape, cfg.hidden_size))
    return h0, c0


def torch_lstm(params, batch_first=False):
    """A float64 ``torch.nn.LSTM`` holding ``params``."""
    cfg = infer_config(params)
    lstm = torch.nn.LSTM(
        cfg.input_size,
        cfg.hidden_size,
        num_layers=cfg.num_layers,
        bias=cfg.bias,
        batch_first=batch_first,
        bidirectional=cfg.bidirectional,
        proj_size=cfg.proj_size,
        dtype=torch.float64,
    )
    lstm.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
    return lstm


def torch_forward(lstm, x, hx=None, lengths=None):
    """Run ``lstm`` on NumPy arrays, packing with ``enforce_sorted=False`` when given lengths."""
    inp = torch.from_numpy(x)
    thx = None if hx is None else tuple(torch.from_numpy(a) for a in hx)
    with torch.no_grad():
        if lengths is None:
            out, (h_n, c_n) = lstm(inp, thx)
        else:
            packed = rnn_utils.pack_padded_sequence(
                inp,
                torch.tensor(lengths, dtype=torch.int64),
                batch_first=lstm.batch_first,
                enforce_sorted=False,
            )
            packed_out, (h_n, c_n) = lstm(packed, thx)
            total_length = x.shape[1] if lstm.batch_first else x.shape[0]
            out, _ = rnn_utils.pad_packed_sequence(
                packed_out, batch_first=lstm.batch_first, total_length=total_length
            )
    return out.numpy(), (h_n.numpy(), c_n.numpy())


def assert_same(actual, expected):
    out, (h_n, c_n) = actual
    t_out, (t_h_n, t_c_n) = expected
    assert out.shape == t_out.shape
    assert h_n.shape == t_h_n.shape
    assert c_n.shape == t_c_n.shape
    np.testing.assert_allclose(out, t_out, rtol=RTOL, atol=ATOL, err_msg="output")
    np.testing.assert_allclose(h_n, t_h_n, rtol=RTOL, atol=ATOL, err_msg="h_n")
    np.testing.assert_allclose(c_n, t_c_n, rtol=RTOL, atol=ATOL, err_msg="c_n")


# ---------------------------------------------------------------------------------------
# Against torch.nn.LSTM
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_hx", "given_hx"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch(config, with_hx):
    params, rng = config_params(config)
    x = rng.standard_normal((T, B, INPUT_SIZE))
    hx = random_hx(rng, params) if with_hx else None
    assert_same(lstm_forward(x, params, hx), torch_forward(torch_lstm(params), x, hx))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_batch_first(config):
    params, rng = config_params(config)
    x = rng.standard_normal((B, T, INPUT_SIZE))
    hx = random_hx(rng, params)  # hx is never batch-first
    expected = torch_forward(torch_lstm(params, batch_first=True), x, hx)
    assert_same(lstm_forward(x, params, hx, batch_first=True), expected)


@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_hx", "given_hx"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_unbatched(config, with_hx):
    params, rng = config_params(config)
    x = rng.standard_normal((T, INPUT_SIZE))
    hx = random_hx(rng, params, batch=None) if with_hx else None
    actual = lstm_forward(x, params, hx)
    assert actual[0].ndim == 2 and actual[1][0].ndim == 2 and actual[1][1].ndim == 2
    assert_same(actual, torch_forward(torch_lstm(params), x, hx))


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_hx", "given_hx"])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_lengths_unsorted(config, with_hx, batch_first):
    params, rng = config_params(config)
    shape = (B, T, INPUT_SIZE) if batch_first else (T, B, INPUT_SIZE)
    x = rng.standard_normal(shape)
    hx = random_hx(rng, params) if with_hx else None
    expected = torch_forward(torch_lstm(params, batch_first), x, hx, LENGTHS)
    actual = lstm_forward(x, params, hx, LENGTHS, batch_first=batch_first)
    assert_same(actual, expected)


def test_lengths_all_full_equal_no_lengths():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    assert_same(lstm_forward(x, params, lengths=[T] * B), lstm_forward(x, params))


def test_large_inputs_do_not_overflow():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    params = {name: 50.0 * value for name, value in params.items()}
    x = 1e4 * rng.standard_normal((T, B, INPUT_SIZE))
    hx = tuple(100.0 * a for a in random_hx(rng, params))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        actual = lstm_forward(x, params, hx, LENGTHS)
    assert all(np.isfinite(a).all() for a in (actual[0], *actual[1]))
    assert_same(actual, torch_forward(torch_lstm(params), x, hx, LENGTHS))


def test_float32_computes_in_float32():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    hx = random_hx(rng, params)
    out64, (h64, c64) = lstm_forward(x, params, hx, LENGTHS)
    params32 = {name: value.astype(np.float32) for name, value in params.items()}
    hx32 = tuple(a.astype(np.float32) for a in hx)
    out32, (h32, c32) = lstm_forward(x.astype(np.float32), params32, hx32, LENGTHS)
    for a32, a64 in [(out32, out64), (h32, h64), (c32, c64)]:
        assert a32.dtype == np.float32
        np.testing.assert_allclose(a32, a64, rtol=1e-4, atol=1e-5)


def test_non_contiguous_input():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x_big = rng.standard_normal((2 * T, INPUT_SIZE, B)).transpose(0, 2, 1)
    x = x_big[::2]
    assert not x.flags.c_contiguous
    assert_same(lstm_forward(x, params), lstm_forward(np.ascontiguousarray(x), params))


# ---------------------------------------------------------------------------------------
# Semantics that can be read off the outputs directly
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_size", [0, 2])
def test_final_states_sit_in_the_output(proj_size):
    """Forward h_n is the output at step len-1; reverse h_n is the output at step 0."""
    params, rng = config_params((1, True, proj_size, True))
    x = rng.standard_normal((T, B, INPUT_SIZE))
    out, (h_n, _) = lstm_forward(x, params, random_hx(rng, params), LENGTHS)
    h_out = h_n.shape[-1]
    for b, n in enumerate(LENGTHS):
        np.testing.assert_array_equal(out[n - 1, b, :h_out], h_n[0, b])
        np.testing.assert_array_equal(out[0, b, h_out:], h_n[1, b])
        np.testing.assert_array_equal(out[n:, b], 0.0)


def test_padding_does_not_leak():
    """Changing the padded steps of x changes nothing."""
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    x_other = x.copy()
    for b, n in enumerate(LENGTHS):
        x_other[n:, b] = rng.standard_normal((T - n, INPUT_SIZE))
    hx = random_hx(rng, params)
    assert_same(lstm_forward(x_other, params, hx, LENGTHS), lstm_forward(x, params, hx, LENGTHS))


# ---------------------------------------------------------------------------------------
# Dropout masks, against single-layer torch LSTMs composed by hand
# ---------------------------------------------------------------------------------------


def single_layer_params(params, layer):
    """The parameters of ``layer``, renamed as layer 0 of a one-layer LSTM."""
    out = {}
    for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
        for direction in ("", "_reverse"):
            name = f"{base}_l{layer}{direction}"
            if name in params:
                out[f"{base}_l0{direction}"] = params[name]
    return out


def composed_forward(x, params, hx, lengths, masks):
    """Time-major x; layers run one at a time in torch, output times mask between them."""
    cfg = infer_config(params)
    D = cfg.num_directions
    layer_input = x
    h_ns, c_ns = [], []
    for k in range(cfg.num_layers):
        layer_params = single_layer_params(params, k)
        assert len(layer_params) == len(params) // cfg.num_layers
        layer_hx = None if hx is None else (hx[0][k * D : (k + 1) * D], hx[1][k * D : (k + 1) * D])
        out, (h_n, c_n) = torch_forward(torch_lstm(layer_params), layer_input, layer_hx, lengths)
        h_ns.append(h_n)
        c_ns.append(c_n)
        layer_input = out * masks[k] if k < cfg.num_layers - 1 else out
    return layer_input, (np.concatenate(h_ns), np.concatenate(c_ns))


def random_masks(rng, params, p=0.4, batch=B):
    cfg = infer_config(params)
    width = cfg.num_directions * cfg.output_size
    shape = (T, width) if batch is None else (T, batch, width)
    return [(rng.random(shape) >= p) / (1.0 - p) for _ in range(cfg.num_layers - 1)]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("config", MULTI_LAYER.values(), ids=MULTI_LAYER.keys())
def test_dropout_masks_match_composition(config, with_lengths):
    params, rng = config_params(config)
    x = rng.standard_normal((T, B, INPUT_SIZE))
    hx = random_hx(rng, params)
    masks = random_masks(rng, params)
    lengths = LENGTHS if with_lengths else None
    expected = composed_forward(x, params, hx, lengths, masks)
    assert_same(lstm_forward(x, params, hx, lengths, dropout_masks=masks), expected)


def test_dropout_masks_composition_without_masks_is_torch():
    """The hand composition itself agrees with torch's multi-layer LSTM when masks are 1."""
    params, rng = config_params(CONFIGS["bi_proj_3layers_no_bias"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    hx = random_hx(rng, params)
    ones = [np.ones_like(m) for m in random_masks(rng, params)]
    expected = torch_forward(torch_lstm(params), x, hx, LENGTHS)
    assert_same(composed_forward(x, params, hx, LENGTHS, ones), expected)
    assert_same(lstm_forward(x, params, hx, LENGTHS, dropout_masks=ones), expected)


def test_dropout_masks_are_time_major_with_batch_first():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    masks = random_masks(rng, params)
    out, (h_n, c_n) = lstm_forward(x, params, None, LENGTHS, dropout_masks=masks)
    out_bf, (h_n_bf, c_n_bf) = lstm_forward(
        x.transpose(1, 0, 2), params, None, LENGTHS, batch_first=True, dropout_masks=masks
    )
    assert_same((out_bf.transpose(1, 0, 2), (h_n_bf, c_n_bf)), (out, (h_n, c_n)))


def test_dropout_masks_unbatched():
    params, rng = config_params(CONFIGS["bi_proj_2layers"])
    x = rng.standard_normal((T, INPUT_SIZE))
    hx = random_hx(rng, params, batch=None)
    masks = random_masks(rng, params, batch=None)
    out, (h_n, c_n) = lstm_forward(x, params, hx, dropout_masks=masks)
    expected = composed_forward(
        x[:, None], params, tuple(a[:, None] for a in hx), None, [m[:, None] for m in masks]
    )
    assert_same((out[:, None], (h_n[:, None], c_n[:, None])), expected)


# ---------------------------------------------------------------------------------------
# init_params and argument checking
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_init_params_named_shaped_and_ordered_like_torch(config):
    params, _ = config_params(config)
    reference_state = torch_lstm(params).state_dict()
    assert list(params) == list(reference_state)
    assert list(params) == param_names(*config)
    bound = 1.0 / np.sqrt(HIDDEN_SIZE)
    for name, value in params.items():
        assert value.shape == tuple(reference_state[name].shape)
        assert value.dtype == np.float64
        assert np.all(np.abs(value) <= bound)
    gates = np.split(params["weight_ih_l0"], 4)
    assert all(not np.array_equal(gates[0], g) for g in gates[1:])


def test_init_params_dtype():
    params = init_params(np.random.default_rng(0), 3, 4, dtype=np.float32)
    assert all(value.dtype == np.float32 for value in params.values())


def test_infer_config():
    params, _ = config_params(CONFIGS["bi_proj_3layers_no_bias"])
    cfg = infer_config(params)
    assert (cfg.input_size, cfg.hidden_size, cfg.num_layers) == (INPUT_SIZE, HIDDEN_SIZE, 3)
    assert (cfg.bidirectional, cfg.proj_size, cfg.bias) == (True, 3, False)
    assert (cfg.num_directions, cfg.output_size) == (2, 3)


def test_errors():
    params, rng = config_params(CONFIGS["two_layers"])
    x = rng.standard_normal((T, B, INPUT_SIZE))
    with pytest.raises(ValueError, match="cell"):
        lstm_forward(x, params, cell="peephole")
    with pytest.raises(ValueError, match="lengths"):
        lstm_forward(x, params, lengths=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        lstm_forward(x, params, lengths=[T + 1, 1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        lstm_forward(x, params, lengths=[1, 2])
    with pytest.raises(ValueError, match="dropout_masks"):
        lstm_forward(x, params, dropout_masks=[])
    with pytest.raises(ValueError, match="h0"):
        lstm_forward(x, params, hx=(np.zeros((1, B, HIDDEN_SIZE)), np.zeros((2, B, HIDDEN_SIZE))))
    with pytest.raises(ValueError, match="params"):
        lstm_forward(x, {**params, "weight_hr_l1": np.zeros((2, HIDDEN_SIZE))})
    with pytest.raises(ValueError, match="input size"):
        lstm_forward(x[..., :2], params)
    with pytest.raises(TypeError, match="dtype"):
        lstm_forward(x.astype(np.int64), params)
