"""ONNX export (numlstm.to_onnx) and import (numlstm.from_onnx).

Oracles: onnxruntime's CPU provider (float32 only: it has no float64 LSTM, and runs only
``layout=0``) and ``onnx.reference.ReferenceEvaluator`` (float32 and float64, both
layouts, but it ignores ``sequence_lens``, so it is used only without lengths), plus the
expected outputs of ONNX's own LSTM node tests.

Tolerances: the issue asks for onnxruntime to equal numlstm to 1e-5 in float32
(:data:`ORT_RTOL`, relative to the largest magnitude as everywhere in these tests;
measured: a few 1e-7). The reference evaluator computes in the model's dtype with NumPy,
so float64 uses the suite's float64 tolerance; its float32 results round differently from
ours by about 1e-7, inside the same 1e-5.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import TOLERANCE, assert_close
from hypothesis import given
from hypothesis import strategies as st
from lstm_cases import assert_close_float32
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import numlstm
from numlstm.onnx import ONNX_GATES, reverse_sequences

ORT_RTOL = 1e-5
RTOL = {np.dtype(np.float32): ORT_RTOL, np.dtype(np.float64): TOLERANCE[np.dtype(np.float64)]}


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def random_lstm(seed, input_size=3, hidden_size=4, dtype="float32", **kwargs):
    """A model with standard-normal weights: every gate and bias entry distinct, and large
    enough that a swapped gate block changes every output."""
    lstm = numlstm.LSTM(input_size, hidden_size, dtype=dtype, seed=seed, **kwargs).eval()
    rng = np.random.default_rng(seed)
    lstm.load_state_dict(
        {k: rng.standard_normal(v.shape).astype(dtype) for k, v in lstm.state_dict().items()}
    )
    return lstm


def run_ort(model, feeds):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_reference(model, feeds):
    return ReferenceEvaluator(model).run(None, feeds)


def export_feeds(lstm, steps, batch, seed, initial_states, lengths):
    """Inputs of an exported graph, and the same as numlstm call arguments."""
    rng = np.random.default_rng([seed, 1])
    dtype = lstm.dtype
    shape = (batch, steps) if lstm.batch_first else (steps, batch)
    feeds = {"x": rng.standard_normal((*shape, lstm.input_size)).astype(dtype)}
    call = {"x": feeds["x"]}
    if initial_states:
        states = (lstm.num_layers * (2 if lstm.bidirectional else 1), batch, lstm.hidden_size)
        feeds["h0"] = rng.standard_normal(states).astype(dtype)
        feeds["c0"] = rng.standard_normal(states).astype(dtype)
        call["hx"] = (feeds["h0"], feeds["c0"])
    if lengths:
        feeds["lengths"] = rng.integers(1, steps + 1, batch).astype(np.int64)
        feeds["lengths"][0] = steps
        if batch > 1:
            feeds["lengths"][1] = 1
        call["lengths"] = feeds["lengths"]
    return feeds, call


def numlstm_outputs(lstm, x, hx=None, lengths=None):
    output, (h_n, c_n) = lstm(x, hx, lengths)
    return output, h_n, c_n


def assert_outputs_close(actual, expected, rtol, names=("output", "h_n", "c_n")):
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, rtol=rtol, name=name)


def lstm_node_model(
    weights,
    *,
    dtype=np.float32,
    direction="forward",
    layout=0,
    initial_states=False,
    lengths=False,
    as_inputs=(),
    constants=(),
    **attributes,
):
    """A graph of one ONNX LSTM node.

    ``weights`` maps ``W``, ``R`` and optionally ``B``, ``P`` to arrays, made initializers
    unless named in ``as_inputs`` (then graph inputs). ``constants`` maps other node inputs
    (``initial_h``, ...) to initializers.
    """
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    directions, hidden = weights["W"].shape[0], weights["R"].shape[2]
    time_batch = ["B", "T"] if layout else ["T", "B"]
    states = ["B", directions, hidden] if layout else [directions, "B", hidden]
    inputs = [helper.make_tensor_value_info("X", tensor_type, [*time_batch, None])]
    initializers = []
    for name, array in weights.items():
        if name in as_inputs:
            inputs.append(helper.make_tensor_value_info(name, tensor_type, array.shape))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    for name, array in dict(constants).items():
        initializers.append(numpy_helper.from_array(array, name))
    if initial_states:
        inputs += [
            helper.make_tensor_value_info(name, tensor_type, states)
            for name in ("initial_h", "initial_c")
        ]
    if lengths:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))
    present = {*weights, *dict(constants)}
    if initial_states:
        present |= {"initial_h", "initial_c"}
    if lengths:
        present.add("sequence_lens")
    node_inputs = ["X", *(n if n in present else "" for n in onnx_input_names()[1:])]
    while not node_inputs[-1]:
        node_inputs.pop()
    node = helper.make_node(
        "LSTM",
        node_inputs,
        ["Y", "Y_h", "Y_c"],
        name="the_lstm",
        **{"hidden_size": hidden, "direction": direction, "layout": layout, **attributes},
    )
    y_shape = ["B", "T", directions, hidden] if layout else ["T", directions, "B", hidden]
    outputs = [
        helper.make_tensor_value_info("Y", tensor_type, y_shape),
        helper.make_tensor_value_info("Y_h", tensor_type, states),
        helper.make_tensor_value_info("Y_c", tensor_type, states),
    ]
    graph = helper.make_graph([node], "one_lstm", inputs, outputs, initializers)
    opset = helper.make_opsetid("", 17)
    model = helper.make_model(
        graph, opset_imports=[opset], ir_version=helper.find_min_ir_version_for([opset])
    )
    onnx.checker.check_model(model)
    return model


def onnx_input_names():
    return ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


def random_onnx_weights(rng, directions, input_size, hidden, dtype, bias=True):
    shapes = {
        "W": (directions, 4 * hidden, input_size),
        "R": (directions, 4 * hidden, hidden),
        "B": (directions, 8 * hidden),
    }
    if not bias:
        del shapes["B"]
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def as_onnx_outputs(output, h_n, c_n, layout, directions):
    """numlstm's ``output``, ``h_n``, ``c_n`` in the shapes of ONNX's ``Y``, ``Y_h``, ``Y_c``."""
    steps_batch = output.shape[:2]
    y = output.reshape(*steps_batch, directions, -1)  # (T, B, D, H) or (B, T, D, H)
    if layout:
        return y, h_n.transpose(1, 0, 2), c_n.transpose(1, 0, 2)
    return y.transpose(0, 2, 1, 3), h_n, c_n


def run_imported(lstm, inputs, layout, directions, reverse=False):
    """Run an imported model on an ONNX node's inputs (by name); ONNX-shaped outputs."""
    x, lengths = inputs["X"], inputs.get("sequence_lens")
    hx = None
    if "initial_h" in inputs:
        hx = tuple(
            inputs[name].transpose(1, 0, 2) if layout else inputs[name]
            for name in ("initial_h", "initial_c")
        )
    if reverse:
        x = reverse_sequences(x, lengths, batch_first=lstm.batch_first)
    output, (h_n, c_n) = lstm(x, hx, lengths)
    if reverse:
        output = reverse_sequences(output, lengths, batch_first=lstm.batch_first)
    return as_onnx_outputs(output, h_n, c_n, layout, directions)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

EXPORT_COMBINATIONS = [
    pytest.param(layers, bidirectional, batch_first, bias, id=f"L{layers}-{kind}-{layout}-{b}")
    for layers in (1, 2, 3)
    for bidirectional, kind in ((False, "uni"), (True, "bi"))
    for batch_first, layout in ((False, "TB"), (True, "BT"))
    for bias, b in ((True, "bias"), (False, "nobias"))
]


@pytest.mark.parametrize("initial_states", [False, True], ids=["zero_states", "h0c0"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first", "bias"), EXPORT_COMBINATIONS)
def test_export_runs_in_onnxruntime_as_numlstm(
    layers, bidirectional, batch_first, bias, lengths, initial_states
):
    seed = 7 * layers + 3 * bidirectional + 2 * batch_first + bias
    lstm = random_lstm(
        seed,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
    )
    model = numlstm.to_onnx(lstm, initial_states=initial_states, lengths=lengths)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node].count("LSTM") == layers
    feeds, call = export_feeds(lstm, 6, 4, seed, initial_states, lengths)
    assert_outputs_close(run_ort(model, feeds), numlstm_outputs(lstm, **call), ORT_RTOL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first", "bias"), EXPORT_COMBINATIONS)
def test_export_matches_onnx_reference_evaluator(layers, bidirectional, batch_first, bias, dtype):
    """Both dtypes (onnxruntime has no float64 LSTM); no lengths (the evaluator ignores them)."""
    seed = 11 * layers + 5 * bidirectional + 2 * batch_first + bias
    lstm = random_lstm(
        seed,
        dtype=dtype,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
    )
    model = numlstm.to_onnx(lstm, initial_states=True)
    feeds, call = export_feeds(lstm, 5, 3, seed, initial_states=True, lengths=False)
    assert_outputs_close(
        run_reference(model, feeds), numlstm_outputs(lstm, **call), RTOL[np.dtype(dtype)]
    )


def test_export_graph_shapes_are_free_in_time_and_batch():
    """One exported graph serves every T and B, and declares numlstm's shapes."""
    lstm = random_lstm(3, num_layers=2, bidirectional=True, batch_first=True)
    model = numlstm.to_onnx(lstm, initial_states=True, lengths=True)

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert {v.name: dims(v) for v in model.graph.input} == {
        "x": ["B", "T", 3],
        "h0": [4, "B", 4],
        "c0": [4, "B", 4],
        "lengths": ["B"],
    }
    assert {v.name: dims(v) for v in model.graph.output} == {
        "output": ["B", "T", 8],
        "h_n": [4, "B", 4],
        "c_n": [4, "B", 4],
    }
    for steps, batch in ((1, 1), (9, 2)):
        feeds, call = export_feeds(lstm, steps, batch, steps, True, True)
        assert_outputs_close(run_ort(model, feeds), numlstm_outputs(lstm, **call), ORT_RTOL)


def test_export_reorders_gate_blocks_to_onnx_order():
    """W's block n is our block for ONNX's gate n: i, o, f, c (our g)."""
    lstm = random_lstm(0, hidden_size=2, bidirectional=True)
    model = numlstm.to_onnx(lstm)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ours = "ifgo"
    assert ONNX_GATES == ("i", "o", "f", "g")
    for direction, suffix in enumerate(("", "_reverse")):
        for block, symbol in enumerate(ONNX_GATES):
            rows = slice(2 * ours.index(symbol), 2 * ours.index(symbol) + 2)
            onnx_rows = slice(2 * block, 2 * block + 2)
            state = lstm.state_dict()
            np.testing.assert_array_equal(
                weights["lstm_l0.W"][direction, onnx_rows], state[f"weight_ih_l0{suffix}"][rows]
            )
            np.testing.assert_array_equal(
                weights["lstm_l0.R"][direction, onnx_rows], state[f"weight_hh_l0{suffix}"][rows]
            )
            np.testing.assert_array_equal(
                weights["lstm_l0.B"][direction, onnx_rows], state[f"bias_ih_l0{suffix}"][rows]
            )
            np.testing.assert_array_equal(
                weights["lstm_l0.B"][direction, 8 + 2 * block : 8 + 2 * block + 2],
                state[f"bias_hh_l0{suffix}"][rows],
            )


@pytest.mark.parametrize("opset", [14, 17, 21])
def test_export_opsets(opset):
    lstm = random_lstm(1, num_layers=2, bidirectional=True)
    model = numlstm.to_onnx(lstm, opset=opset, lengths=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    feeds, call = export_feeds(lstm, 4, 3, 1, False, True)
    assert_outputs_close(run_ort(model, feeds), numlstm_outputs(lstm, **call), ORT_RTOL)


def test_export_writes_path_and_ignores_dropout_in_training_mode(tmp_path):
    lstm = random_lstm(2, num_layers=2, dropout=0.5).train()
    path = tmp_path / "lstm.onnx"
    model = numlstm.to_onnx(lstm, path)
    assert onnx.load_model(path) == model
    feeds, call = export_feeds(lstm, 5, 2, 2, False, False)
    assert_outputs_close(run_ort(model, feeds), numlstm_outputs(lstm.eval(), **call), ORT_RTOL)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize(
    ("layers", "bidirectional", "batch_first", "bias"),
    [(1, False, False, True), (2, True, True, False), (3, True, False, True)],
    ids=["L1-uni-TB-bias", "L2-bi-BT-nobias", "L3-bi-TB-bias"],
)
def test_peephole_export_runs_in_onnxruntime_and_the_reference_as_numlstm(
    layers, bidirectional, batch_first, bias, lengths
):
    """Standard-normal weights and peepholes, every row distinct: a swapped peephole row
    (ONNX orders them i, o, f) changes every output."""
    seed = 5 * layers + bidirectional + 2 * batch_first + bias
    lstm = random_lstm(
        seed,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        cell="peephole",
    )
    model = numlstm.to_onnx(lstm, initial_states=True, lengths=lengths)
    onnx.checker.check_model(model, full_check=True)
    assert all(len(n.input) == 8 and n.input[7] for n in model.graph.node if n.op_type == "LSTM")
    feeds, call = export_feeds(lstm, 6, 4, seed, True, lengths)
    expected = numlstm_outputs(lstm, **call)
    assert_outputs_close(run_ort(model, feeds), expected, ORT_RTOL)
    if not lengths:  # the reference evaluator ignores sequence_lens
        assert_outputs_close(run_reference(model, feeds), expected, ORT_RTOL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_peephole_round_trip_is_exact(dtype, tmp_path):
    lstm = random_lstm(4, dtype=dtype, num_layers=2, bidirectional=True, cell="peephole")
    path = tmp_path / "peephole.onnx"
    numlstm.to_onnx(lstm, path)
    imported = numlstm.from_onnx(path)
    assert repr(imported) == repr(lstm.eval())
    expected, actual = lstm.state_dict(), imported.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_import_random_peephole_node_matches_reference_evaluator(dtype, direction):
    rng = np.random.default_rng(len(direction))
    directions = 2 if direction == "bidirectional" else 1
    steps, batch, input_size, hidden = 5, 3, 2, 4
    weights = random_onnx_weights(rng, directions, input_size, hidden, dtype)
    weights["P"] = rng.standard_normal((directions, 3 * hidden)).astype(dtype)
    model = lstm_node_model(weights, dtype=dtype, direction=direction, initial_states=True)
    lstm = numlstm.from_onnx(model)
    assert lstm.cell == "peephole"
    states = (directions, batch, hidden)
    inputs = {
        "X": rng.standard_normal((steps, batch, input_size)).astype(dtype),
        "initial_h": rng.standard_normal(states).astype(dtype),
        "initial_c": rng.standard_normal(states).astype(dtype),
    }
    expected = run_reference(model, inputs)
    actual = run_imported(lstm, inputs, 0, directions)
    for name, a, e in zip(("Y", "Y_h", "Y_c"), actual, expected, strict=True):
        assert_close(a, e, rtol=RTOL[np.dtype(dtype)], name=name)


def test_import_rejects_a_peephole_input_of_the_wrong_shape():
    weights = random_onnx_weights(np.random.default_rng(0), 1, 2, 3, np.float32)
    weights["P"] = np.zeros((1, 6), np.float32)
    with pytest.raises(ValueError, match=r"P must be .* = \(1, 9\), got shape \(1, 6\)"):
        numlstm.from_onnx(lstm_node_model(weights))


def test_export_errors():
    with pytest.raises(ValueError, match=r"proj_size=2.*no projection"):
        numlstm.to_onnx(numlstm.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match=r"cell='ltm_stm': ONNX's LSTM operator has no use"):
        numlstm.to_onnx(numlstm.LSTM(3, 4, cell="ltm_stm"))
    with pytest.raises(TypeError, match=r"lstm must be a numlstm\.LSTM, got dict"):
        numlstm.to_onnx({})
    lstm = numlstm.LSTM(3, 4)
    with pytest.raises(ValueError, match="opset must be an integer >= 14, got 13"):
        numlstm.to_onnx(lstm, opset=13)
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(ValueError, match=f"opset must be between 14 and {newest}"):
        numlstm.to_onnx(lstm, opset=newest + 1)
    with pytest.raises(TypeError, match="initial_states must be True or False"):
        numlstm.to_onnx(lstm, initial_states=1)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        numlstm.to_onnx(lstm, 3)


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("layers", "bidirectional", "batch_first", "bias"), EXPORT_COMBINATIONS)
def test_round_trip_is_exact(layers, bidirectional, batch_first, bias, dtype, tmp_path):
    lstm = random_lstm(
        layers,
        dtype=dtype,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
    )
    path = tmp_path / "lstm.onnx"
    numlstm.to_onnx(lstm, path, initial_states=True, lengths=True)
    imported = numlstm.from_onnx(path)
    assert repr(imported) == repr(lstm.eval())
    assert imported.training is False
    expected = lstm.state_dict()
    actual = imported.state_dict()
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        assert actual[name].dtype == expected[name].dtype


@functools.cache
def onnx_lstm_node_cases():
    """ONNX's own node tests of the LSTM operator."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other operators' cases overflow on purpose
        cases = collect_testcases()
    return {
        case.name: case
        for case in cases
        if any(node.op_type == "LSTM" for node in case.model.graph.node)
    }


def fold_weights(model, inputs):
    """The node test's model with W, R, B and P made initializers from the test's data."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    (node,) = graph.node
    names = dict(zip(onnx_input_names(), node.input, strict=False))
    folded = {names[n] for n in ("W", "R", "B", "P") if names.get(n)}
    kept = [v for v in graph.input if v.name not in folded]
    graph.initializer.extend(numpy_helper.from_array(inputs[n], n) for n in folded)
    del graph.input[:]
    graph.input.extend(kept)
    return model, node, {v: inputs[v] for v in (k.name for k in kept)}, names


def node_case_data(case):
    (data,) = case.data_sets
    inputs = dict(zip((v.name for v in case.model.graph.input), data[0], strict=True))
    expected = dict(zip((v.name for v in case.model.graph.output), data[1], strict=True))
    return inputs, expected


def test_onnx_node_cases_are_found():
    assert {"test_lstm_defaults", "test_lstm_with_peepholes"} <= set(onnx_lstm_node_cases())


@pytest.mark.parametrize("name", sorted(onnx_lstm_node_cases()))
def test_onnx_node_case(name):
    """Each of ONNX's LSTM node tests imports and reproduces its expected outputs."""
    case = onnx_lstm_node_cases()[name]
    inputs, expected = node_case_data(case)
    model, node, run_inputs, names = fold_weights(case.model, inputs)
    with pytest.raises(
        ValueError, match=r"LSTM node #0 \(unnamed\): input W \('W'\) must be an initializer"
    ):
        numlstm.from_onnx(case.model)  # weights fed at run time cannot be imported
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    direction = attributes.get("direction", b"forward").decode()
    reverse = direction == "reverse"
    if reverse:
        with pytest.raises(ValueError, match="runs direction='reverse' only"):
            numlstm.from_onnx(model)
    lstm = numlstm.from_onnx(model, reverse_as_forward=reverse)
    assert lstm.cell == ("peephole" if names.get("P") else "standard")
    layout = attributes.get("layout", 0)
    directions = 2 if direction == "bidirectional" else 1
    renamed = {key: run_inputs[names[key]] for key in names if names[key] in run_inputs}
    actual = run_imported(lstm, renamed, layout, directions, reverse)
    compared = [name for name in node.output if name]
    for graph_name, value in zip(node.output, actual, strict=False):
        if graph_name:
            assert_close(value, expected[graph_name], rtol=ORT_RTOL, name=graph_name)
    assert compared and set(compared) == set(expected)


@pytest.mark.parametrize("bias", [True, False], ids=["B", "noB"])
@pytest.mark.parametrize("initial_states", [False, True], ids=["zero_states", "initial"])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_import_random_node_matches_reference_evaluator(
    dtype, direction, layout, initial_states, bias
):
    """Gate-distinct random weights (ONNX's own cases use uniform ones)."""
    rng = np.random.default_rng([layout, initial_states, bias, len(direction)])
    directions = 2 if direction == "bidirectional" else 1
    steps, batch, input_size, hidden = 5, 3, 2, 4
    weights = random_onnx_weights(rng, directions, input_size, hidden, dtype, bias)
    model = lstm_node_model(
        weights, dtype=dtype, direction=direction, layout=layout, initial_states=initial_states
    )
    reverse = direction == "reverse"
    lstm = numlstm.from_onnx(model, reverse_as_forward=reverse)
    assert (lstm.batch_first, lstm.bidirectional, lstm.bias) == (layout == 1, directions == 2, bias)
    assert lstm.dtype == dtype
    time_batch = (batch, steps) if layout else (steps, batch)
    inputs = {"X": rng.standard_normal((*time_batch, input_size)).astype(dtype)}
    if initial_states:
        states = (batch, directions, hidden) if layout else (directions, batch, hidden)
        inputs["initial_h"] = rng.standard_normal(states).astype(dtype)
        inputs["initial_c"] = rng.standard_normal(states).astype(dtype)
    expected = run_reference(model, inputs)
    actual = run_imported(lstm, inputs, layout, directions, reverse)
    assert_outputs_close(actual, expected, RTOL[np.dtype(dtype)], ("Y", "Y_h", "Y_c"))


@st.composite
def onnx_node_cases(draw):
    """An ONNX LSTM node onnxruntime runs (float32, layout 0) and a padded batch for it."""
    return {
        "direction": draw(st.sampled_from(["forward", "reverse", "bidirectional"])),
        "steps": draw(st.integers(1, 6)),
        "batch": draw(st.integers(1, 4)),
        "input_size": draw(st.integers(1, 4)),
        "hidden": draw(st.integers(1, 4)),
        "bias": draw(st.booleans()),
        "initial_states": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(onnx_node_cases(), st.data())
def test_import_random_node_matches_onnxruntime_with_lengths(case, data):
    """onnxruntime honours sequence_lens: zero Y past each length, Y_h and Y_c at the last
    real step (the first, for the reverse direction), as numlstm's lengths."""
    rng = np.random.default_rng(case["seed"])
    direction, steps, batch, hidden = (case[k] for k in ("direction", "steps", "batch", "hidden"))
    directions = 2 if direction == "bidirectional" else 1
    weights = random_onnx_weights(
        rng, directions, case["input_size"], hidden, np.float32, case["bias"]
    )
    model = lstm_node_model(
        weights, direction=direction, initial_states=case["initial_states"], lengths=True
    )
    lengths = data.draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    inputs = {
        "X": rng.standard_normal((steps, batch, case["input_size"])).astype(np.float32),
        "sequence_lens": np.array(lengths, np.int32),
    }
    if case["initial_states"]:
        for name in ("initial_h", "initial_c"):
            inputs[name] = rng.standard_normal((directions, batch, hidden)).astype(np.float32)
    reverse = direction == "reverse"
    lstm = numlstm.from_onnx(model, reverse_as_forward=reverse)
    actual = run_imported(lstm, inputs, 0, directions, reverse)
    expected = run_ort(model, inputs)
    # Scale floored at 1 (lstm_cases.assert_close_float32): both sides round in float32 at
    # an absolute ~1e-8 on these order-one terms, so an output that is tiny by cancellation
    # (found: max |Y| 2.9e-4, error 8.9e-9 with T = B = H = 1) cannot meet ORT_RTOL of its
    # own magnitude.
    for name, a, e in zip(("Y", "Y_h", "Y_c"), actual, expected, strict=True):
        assert_close_float32(a, e, ORT_RTOL, name=name)


def forward_weights(rng, input_size=2, hidden=3):
    return random_onnx_weights(rng, 1, input_size, hidden, np.float32)


IMPORT_ERRORS = [
    pytest.param(
        {"activations": ["Sigmoid", "Tanh", "Relu"]},
        ValueError,
        r"LSTM node 'the_lstm' has activations \['sigmoid', 'tanh', 'relu'\]: numlstm computes "
        r"the gates with \['sigmoid', 'tanh', 'tanh'\] per direction only",
        id="activations",
    ),
    pytest.param(
        {"activations": ["Sigmoid", "Tanh", "Tanh"], "activation_alpha": [0.5]},
        ValueError,
        r"'the_lstm' sets activation_alpha=\[0.5\]: numlstm's activations take no parameters",
        id="activation_alpha",
    ),
    pytest.param(
        {"clip": 3.0},
        ValueError,
        r"'the_lstm' clips the gate inputs \(clip=3.0\): numlstm does not clip",
        id="clip",
    ),
    pytest.param(
        {"input_forget": 1},
        ValueError,
        r"'the_lstm' couples the input and forget gates \(input_forget=1\)",
        id="input_forget",
    ),
    pytest.param(
        {"direction": "reverse"},
        ValueError,
        r"'the_lstm' runs direction='reverse' only, which numlstm.LSTM cannot: .* "
        r"reverse_as_forward=True",
        id="reverse",
    ),
    pytest.param(
        {"layout": 2},
        ValueError,
        r"'the_lstm' has direction='forward', layout=2: ONNX defines direction 'forward', "
        r"'reverse' or 'bidirectional' and layout 0 or 1",
        id="layout",
    ),
]


@pytest.mark.parametrize(("attributes", "error", "message"), IMPORT_ERRORS)
def test_import_rejects_unmappable_attributes(attributes, error, message):
    weights = forward_weights(np.random.default_rng(0))
    model = lstm_node_model(weights, **attributes)
    with pytest.raises(error, match=message):
        numlstm.from_onnx(model)


def test_import_default_activations_spelled_out_are_accepted():
    weights = random_onnx_weights(np.random.default_rng(0), 2, 2, 3, np.float32)
    activations = ["Sigmoid", "Tanh", "Tanh"] * 2
    model = lstm_node_model(weights, direction="bidirectional", activations=activations)
    x = np.random.default_rng(1).standard_normal((4, 2, 2)).astype(np.float32)
    lstm = numlstm.from_onnx(model)
    actual = run_imported(lstm, {"X": x}, 0, 2)
    assert_outputs_close(actual, run_ort(model, {"X": x}), ORT_RTOL, ("Y", "Y_h", "Y_c"))


def test_import_rejects_bad_weights_and_constants():
    rng = np.random.default_rng(0)
    weights = forward_weights(rng)
    with pytest.raises(
        ValueError, match=r"'the_lstm': input R \('R'\) must be an initializer .* fed at run time"
    ):
        numlstm.from_onnx(lstm_node_model(weights, as_inputs=("R",)))
    with pytest.raises(
        ValueError,
        match=r"'the_lstm': attribute hidden_size=5 does not match W, whose shape "
        r"\(1, 12, 2\) holds 4 \* 3 gate rows",
    ):
        numlstm.from_onnx(lstm_node_model(weights, hidden_size=5))
    bad_r = {**weights, "R": weights["R"][:, :, :2].copy()}
    with pytest.raises(ValueError, match=r"R must be .* = \(1, 12, 3\), got shape \(1, 12, 2\)"):
        numlstm.from_onnx(lstm_node_model(bad_r, hidden_size=3))
    bad_b = {**weights, "B": weights["B"][:, :12].copy()}
    with pytest.raises(ValueError, match=r"B must be .* = \(1, 24\), got shape \(1, 12\)"):
        numlstm.from_onnx(lstm_node_model(bad_b))
    half = {k: v.astype(np.float16) for k, v in weights.items()}
    with pytest.raises(TypeError, match="weights must be float32 or float64, got float16"):
        numlstm.from_onnx(lstm_node_model(half, dtype=np.float16))
    constant_h = {"initial_h": np.ones((1, 2, 3), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"input initial_h \('initial_h'\) is a constant of the graph; numlstm takes "
        "initial_h when it is called",
    ):
        numlstm.from_onnx(lstm_node_model(weights, constants=constant_h))


def test_import_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match=r"model_or_path must be an onnx\.ModelProto or the path"):
        numlstm.from_onnx(b"bytes")
    with pytest.raises(TypeError, match="reverse_as_forward must be True or False"):
        numlstm.from_onnx(tmp_path / "none.onnx", reverse_as_forward="yes")
    model = lstm_node_model(forward_weights(np.random.default_rng(0)))
    with pytest.raises(
        ValueError, match="reverse_as_forward=True needs LSTM nodes with direction='reverse'"
    ):
        numlstm.from_onnx(model, reverse_as_forward=True)


def edited(model, edit):
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    edit(copy.graph)
    return copy


def test_import_rejects_graphs_that_are_not_an_lstm_stack():
    lstm = random_lstm(0, num_layers=2, bidirectional=True)
    model = numlstm.to_onnx(lstm)

    def add_after_output(graph):
        graph.node.append(helper.make_node("Add", ["output", "output"], ["twice"], name="add"))

    with pytest.raises(
        ValueError, match=r"the graph has Add node 'add' \(ai.onnx.Add\), which from_onnx cannot"
    ):
        numlstm.from_onnx(edited(model, add_after_output))

    def second_layer_reads_x(graph):
        second = next(n for n in graph.node if n.name == "lstm_l1")
        second.input[0] = "lstm_l0.Y_h"

    with pytest.raises(
        ValueError,
        match=r"LSTM node 'lstm_l1': its input X must be computed from Y of LSTM node "
        "'lstm_l0' only",
    ):
        numlstm.from_onnx(edited(model, second_layer_reads_x))

    def mixed_directions(graph):
        first = next(n for n in graph.node if n.name == "lstm_l0")
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for name in ("W", "R", "B"):
            array = weights[f"lstm_l0.{name}"][:1]
            index = next(k for k, i in enumerate(graph.initializer) if i.name == f"lstm_l0.{name}")
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, f"lstm_l0.{name}"))
        for attribute in first.attribute:
            if attribute.name == "direction":
                attribute.s = b"forward"

    with pytest.raises(
        ValueError,
        match=r"the LSTM nodes must share one direction to form a numlstm\.LSTM: LSTM node "
        "'lstm_l0': forward, LSTM node 'lstm_l1': bidirectional",
    ):
        numlstm.from_onnx(edited(model, mixed_directions))

    with pytest.raises(ValueError, match="the graph has no LSTM node"):
        numlstm.from_onnx(edited(model, lambda graph: graph.ClearField("node")))


def test_import_maps_batch_first_from_transposed_input():
    """A graph that transposes a (B, T, I) input before its layout-0 LSTM nodes (as
    to_onnx and torch.onnx export batch_first) imports with batch_first=True."""
    lstm = random_lstm(4, num_layers=2, batch_first=True)
    imported = numlstm.from_onnx(numlstm.to_onnx(lstm))
    assert imported.batch_first
    assert {n.op_type for n in numlstm.to_onnx(lstm).graph.node} >= {"Transpose", "LSTM"}


@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(1, 3),
    st.booleans(),
    st.data(),
)
def test_reverse_sequences_reverses_each_sequence_within_its_length(
    steps, batch, features, batch_first, data
):
    lengths = data.draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch))
    x = np.arange(steps * batch * features, dtype=np.float64).reshape(steps, batch, features)
    given_x = x.transpose(1, 0, 2) if batch_first else x
    flipped = reverse_sequences(given_x, lengths, batch_first=batch_first)
    time_major = flipped.transpose(1, 0, 2) if batch_first else flipped
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(time_major[:n, b], x[:n, b][::-1])
        np.testing.assert_array_equal(time_major[n:, b], x[n:, b])
    np.testing.assert_array_equal(
        reverse_sequences(flipped, lengths, batch_first=batch_first), given_x
    )


def test_reverse_sequences_errors():
    with pytest.raises(TypeError, match="x must be a NumPy array of at least 2 dimensions"):
        reverse_sequences([1, 2])
    with pytest.raises(ValueError, match=r"lengths must hold 2 integers in \[0, 3\], got \[4, 1\]"):
        reverse_sequences(np.zeros((3, 2)), [4, 1])


def test_import_numlstm_does_not_import_onnx():
    code = "import sys, numlstm; numlstm.to_onnx; print('onnx' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_import_stack_of_reverse_nodes_runs_on_reversed_sequences():
    """A stack of reverse-only layers equals the forward stack on each sequence reversed
    within its length; onnxruntime is the oracle, with padding."""
    lstm = random_lstm(5, num_layers=2)
    model = numlstm.to_onnx(lstm, initial_states=True, lengths=True)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "direction":
                attribute.s = b"reverse"
    imported = numlstm.from_onnx(model, reverse_as_forward=True)
    feeds, _ = export_feeds(lstm, 6, 4, 5, initial_states=True, lengths=True)
    lengths = feeds["lengths"]
    output, (h_n, c_n) = imported(
        reverse_sequences(feeds["x"], lengths), (feeds["h0"], feeds["c0"]), lengths
    )
    actual = (reverse_sequences(output, lengths), h_n, c_n)
    assert_outputs_close(actual, run_ort(model, feeds), ORT_RTOL)
