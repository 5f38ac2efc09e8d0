"""ONNX export and import: :func:`to_onnx` and :func:`from_onnx`.

A numlstm layer is one ONNX ``LSTM`` node. The equations are the same; the stacked weights
differ only in the order of the four gate blocks. numlstm (and PyTorch) stack them as
``(i, f, g, o)``; ONNX stacks them as ``(i, o, f, c)``, where ONNX's ``c`` is our cell
candidate ``g``. ONNX's ``B`` is ``[W_b, R_b]``, our ``bias_ih`` and ``bias_hh`` side by
side. A peephole cell (``cell="peephole"``) is ONNX's LSTM with its ``P`` input, whose three
rows per direction are ordered ``(i, o, f)``; ours (``peephole_l{k}``) are ``(i, f, o)``.

The ``onnx`` package is imported only when one of these functions runs, so ``import numlstm``
works without it (``pip install "numlstm[onnx]"`` brings it).
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import numpy as np

from .equations import GATES
from .lstm import LSTM
from .params import param_name
from .validation import check_bool, check_int

#: ONNX's gate order in ``W``, ``R`` and ``B`` (ONNX names the cell candidate ``c``; we name
#: it ``g``). Ours is :data:`numlstm.equations.GATES`: ``i, f, g, o``.
ONNX_GATES = ("i", "o", "f", "g")
_OUR_GATES = tuple(gate.symbol for gate in GATES)
#: Block ``n`` of an ONNX weight is block ``_TO_ONNX[n]`` of ours, and the other way round.
_TO_ONNX = tuple(_OUR_GATES.index(symbol) for symbol in ONNX_GATES)
_FROM_ONNX = tuple(ONNX_GATES.index(symbol) for symbol in _OUR_GATES)

#: The opset that :func:`to_onnx` writes by default, and the oldest it writes: opset 14 is
#: the first with every attribute of the ``LSTM`` operator that ONNX has today.
DEFAULT_OPSET = 17
MIN_OPSET = 14

#: Nodes that :func:`from_onnx` accepts beside ``LSTM`` nodes: they move, cut, join or
#: convert data (the glue that stacked and bidirectional layers need) but compute nothing.
_GLUE_OPS = frozenset(
    {
        "Cast",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Expand",
        "Gather",
        "Identity",
        "Reshape",
        "Shape",
        "Slice",
        "Split",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
    }
)
_DEFAULT_ACTIVATIONS = ("sigmoid", "tanh", "tanh")
_LSTM_INPUTS = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


def _require_onnx():
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as error:
        raise ImportError(
            'ONNX export and import need the onnx package: pip install "numlstm[onnx]"'
        ) from error
    return onnx


class _LayerWeights(NamedTuple):
    """One ONNX ``LSTM`` node's weights, directions stacked on axis 0 (forward first).

    ``W`` is ``(D, 4H, I_k)``, ``R`` is ``(D, 4H, H)``, ``B`` is ``(D, 8H)`` or None without
    bias; the gate blocks in ONNX's order :data:`ONNX_GATES`. ``P`` is ``(D, 3H)``, the
    peephole weights in ONNX's row order :data:`ONNX_PEEPHOLES`, or None without peepholes.
    """

    W: np.ndarray
    R: np.ndarray
    B: np.ndarray | None
    P: np.ndarray | None = None


#: ONNX's order of the peephole rows in ``P``; ours (``peephole_l{k}``) is ``i, f, o``.
ONNX_PEEPHOLES = ("i", "o", "f")
#: Row ``n`` of ONNX's ``P`` is row ``_PEEPHOLE_ROWS[n]`` of ours, and the other way round
#: (the permutation is its own inverse).
_PEEPHOLE_ROWS = tuple(("i", "f", "o").index(symbol) for symbol in ONNX_PEEPHOLES)


def _reorder_gates(array, order):
    """The four gate blocks of ``array``'s last-but-one (or only) axis, put in ``order``."""
    axis = 0 if array.ndim == 1 else array.ndim - 2
    blocks = np.split(array, 4, axis=axis)
    return np.concatenate([blocks[n] for n in order], axis=axis)


def _layer_to_onnx(spec, params, layer):
    """Our parameters of one layer (both directions) as the ONNX node's ``W``, ``R``, ``B``."""
    directions = [spec.layer_weights(params, layer, d) for d in range(spec.num_directions)]
    W = np.stack([_reorder_gates(w_ih, _TO_ONNX) for w_ih, *_ in directions])
    R = np.stack([_reorder_gates(w_hh, _TO_ONNX) for _, w_hh, *_ in directions])
    B = None
    if spec.bias:
        B = np.stack(
            [
                np.concatenate([_reorder_gates(b_ih, _TO_ONNX), _reorder_gates(b_hh, _TO_ONNX)])
                for _, _, b_ih, b_hh, _ in directions
            ]
        )
    P = None
    if spec.cell == "peephole":
        P = np.stack(
            [
                spec.cell_weights(params, layer, d)[0][list(_PEEPHOLE_ROWS)].reshape(-1)
                for d in range(spec.num_directions)
            ]
        )
    return _LayerWeights(W, R, B, P)


def _layer_from_onnx(weights, layer, bias, peephole):
    """The ONNX node's weights as our parameters of one layer, named as PyTorch names them.

    With ``peephole``, a node without ``P`` gets zero peephole weights.
    """
    hidden = weights.R.shape[2]
    params = {}
    for direction in range(weights.W.shape[0]):
        params[param_name("weight_ih", layer, direction)] = _reorder_gates(
            weights.W[direction], _FROM_ONNX
        )
        params[param_name("weight_hh", layer, direction)] = _reorder_gates(
            weights.R[direction], _FROM_ONNX
        )
        if bias:
            b = weights.B[direction] if weights.B is not None else np.zeros(8 * hidden)
            b = b.astype(weights.W.dtype, copy=False)
            params[param_name("bias_ih", layer, direction)] = _reorder_gates(
                b[: 4 * hidden], _FROM_ONNX
            )
            params[param_name("bias_hh", layer, direction)] = _reorder_gates(
                b[4 * hidden :], _FROM_ONNX
            )
        if peephole:
            p = weights.P[direction] if weights.P is not None else np.zeros(3 * hidden)
            p = p.astype(weights.W.dtype, copy=False).reshape(3, hidden)
            params[param_name("peephole", layer, direction)] = p[list(_PEEPHOLE_ROWS)]
    return params


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------


def _check_exportable(lstm):
    if not isinstance(lstm, LSTM):
        raise TypeError(f"lstm must be a numlstm.LSTM, got {type(lstm).__name__}")
    if lstm.proj_size:
        raise ValueError(
            f"lstm has proj_size={lstm.proj_size}: ONNX's LSTM operator has no projection "
            "of the hidden state, so a model with proj_size > 0 cannot be exported"
        )
    if lstm.cell == "ltm_stm":
        raise ValueError(
            "lstm has cell='ltm_stm': ONNX's LSTM operator has no use layer (W_u), so this "
            "cell cannot be exported; 'standard' and 'peephole' can"
        )


def _check_opset(opset, onnx):
    if opset is None:
        return DEFAULT_OPSET
    newest = onnx.defs.onnx_opset_version()
    opset = check_int(opset, "opset", MIN_OPSET)
    if opset > newest:
        raise ValueError(
            f"opset must be between {MIN_OPSET} and {newest} (the newest this onnx "
            f"{onnx.__version__} knows), got {opset}"
        )
    return opset


class _GraphBuilder:
    """Collects nodes and initializers, giving every value a unique name."""

    def __init__(self, onnx):
        self.helper = onnx.helper
        self.numpy_helper = onnx.numpy_helper
        self.nodes = []
        self.initializers = []

    def constant(self, name, array):
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type, inputs, outputs, name=None, **attributes):
        """Add a node (named after its first output unless ``name``); return its outputs."""
        node = self.helper.make_node(
            op_type, inputs, outputs, name=name or outputs[0], **attributes
        )
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs


def _node_inputs(named):
    """An LSTM node's inputs in the operator's order: ``""`` for absent ones, trailing ones
    dropped."""
    inputs = [named.get(name, "") for name in _LSTM_INPUTS]
    while not inputs[-1]:
        inputs.pop()
    return inputs


def _add_layer(graph, spec, params, layer, layer_input, shared, initial_states, output_name):
    """Add layer ``layer``: its LSTM node and the reshapes around it.

    Returns
    -------
    output : str
        The layer's output, ``(T, B, D * H)``, named ``output_name``.
    y_h, y_c : str
        Its final states, ``(D, B, H)``.
    """
    prefix = f"lstm_l{layer}"
    named = {"X": layer_input, **shared}
    for name, array in _layer_to_onnx(spec, params, layer)._asdict().items():
        if array is not None:
            named[name] = graph.constant(f"{prefix}.{name}", array)
    if initial_states:
        directions = spec.num_directions
        starts = graph.constant(f"{prefix}.states_start", np.array([layer * directions]))
        ends = graph.constant(f"{prefix}.states_end", np.array([(layer + 1) * directions]))
        for onnx_name, ours in (("initial_h", "h0"), ("initial_c", "c0")):
            named[onnx_name] = graph.node(
                "Slice", [ours, starts, ends, "slice_axes"], [f"{prefix}.{ours}"]
            )
    y, y_h, y_c = graph.node(
        "LSTM",
        _node_inputs(named),
        [f"{prefix}.Y", f"{prefix}.Y_h", f"{prefix}.Y_c"],
        name=prefix,
        hidden_size=spec.hidden_size,
        direction="bidirectional" if spec.bidirectional else "forward",
    )
    # Y is (T, D, B, H); the next layer and the caller want (T, B, D * H).
    y = graph.node("Transpose", [y], [f"{prefix}.Y_tbdh"], perm=[0, 2, 1, 3])
    output = graph.node("Reshape", [y, "merge_directions_shape"], [output_name])
    return output, y_h, y_c


def to_onnx(lstm, path=None, *, opset=None, initial_states=False, lengths=False):
    """Export an LSTM as an ONNX model: one ``LSTM`` node per layer.

    Parameters
    ----------
    lstm : numlstm.LSTM
        The model; its parameters are copied into the graph as initializers. The graph
        computes the model in evaluation mode (no dropout).
    path : str or os.PathLike, optional
        Where to write the model as well.
    opset : int, optional
        The ONNX opset, from 14 to the newest that the installed ``onnx`` knows;
        17 by default.
    initial_states : bool, default False
        Whether the graph takes the inputs ``h0`` and ``c0``. Without them the initial
        states are zeros, as with ``lstm(x)``.
    lengths : bool, default False
        Whether the graph takes the input ``lengths``, int64 of shape ``(B,)``, each
        ``1 <= length <= T``, as ``lstm(x, lengths=...)``.

    Returns
    -------
    onnx.ModelProto
        Inputs ``x`` (``(T, B, I)``, or ``(B, T, I)`` with ``batch_first``; ``T`` and ``B``
        are free), then ``h0``, ``c0`` (``(num_layers * D, B, hidden_size)``) and
        ``lengths`` when asked for. Outputs ``output``, ``h_n`` and ``c_n``, shaped as
        ``lstm(x)`` shapes them.

    Raises
    ------
    TypeError
        If ``lstm`` is not a :class:`numlstm.LSTM`.
    ValueError
        If ``lstm`` has ``proj_size > 0`` (ONNX's LSTM has no projection) or
        ``cell="ltm_stm"`` (nor a use layer), or for an opset outside the supported range.
    ImportError
        Without the ``onnx`` package.

    Notes
    -----
    ONNX stacks the gates of ``W``, ``R`` and ``B`` as ``(i, o, f, c)``, numlstm as
    ``(i, f, g, o)``; the export reorders the blocks. A peephole cell exports its weights
    as the node's ``P``, rows reordered from ``(i, f, o)`` to ONNX's ``(i, o, f)``. The
    graph runs every layer in ONNX's time-major layout (``layout=0``, the only one
    onnxruntime runs) and transposes ``x`` and ``output`` for ``batch_first``. onnxruntime
    runs the graph in float32 only; a float64 model exports to a valid graph that other
    runtimes (such as ``onnx.reference``) run.

    Examples
    --------
    >>> lstm = numlstm.LSTM(8, 32, num_layers=2, bidirectional=True, seed=0)
    >>> model = numlstm.to_onnx(lstm, "lstm.onnx", lengths=True)
    >>> session = onnxruntime.InferenceSession("lstm.onnx")
    >>> output, h_n, c_n = session.run(None, {"x": x, "lengths": np.array([5, 3])})
    """
    onnx = _require_onnx()
    _check_exportable(lstm)
    opset = _check_opset(opset, onnx)
    initial_states = check_bool(initial_states, "initial_states")
    lengths = check_bool(lengths, "lengths")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")

    spec, params = lstm.spec, dict(lstm.named_parameters())
    tensor_type = onnx.helper.np_dtype_to_tensor_dtype(spec.dtype)
    directions, hidden = spec.num_directions, spec.hidden_size
    states_shape = [spec.num_layers * directions, "B", hidden]
    x_shape = ["B", "T", spec.input_size] if lstm.batch_first else ["T", "B", spec.input_size]
    graph_inputs = [("x", tensor_type, x_shape)]
    if initial_states:
        graph_inputs += [("h0", tensor_type, states_shape), ("c0", tensor_type, states_shape)]
    if lengths:
        graph_inputs.append(("lengths", onnx.TensorProto.INT64, ["B"]))

    graph = _GraphBuilder(onnx)
    shared = {}  # inputs of every LSTM node: sequence_lens
    layer_input = "x"
    if lstm.batch_first:
        layer_input = graph.node("Transpose", ["x"], ["x_time_major"], perm=[1, 0, 2])
    if lengths:
        shared["sequence_lens"] = graph.node(
            "Cast", ["lengths"], ["sequence_lens"], to=onnx.TensorProto.INT32
        )
    graph.constant("merge_directions_shape", np.array([0, 0, directions * hidden], np.int64))
    if initial_states:
        graph.constant("slice_axes", np.array([0], np.int64))
    final_h, final_c = [], []
    for layer in range(spec.num_layers):
        last = layer == spec.num_layers - 1
        output_name = "output" if last and not lstm.batch_first else f"lstm_l{layer}.output"
        layer_input, y_h, y_c = _add_layer(
            graph, spec, params, layer, layer_input, shared, initial_states, output_name
        )
        final_h.append(y_h)
        final_c.append(y_c)
    if lstm.batch_first:
        graph.node("Transpose", [layer_input], ["output"], perm=[1, 0, 2])
    graph.node("Concat", final_h, ["h_n"], axis=0)
    graph.node("Concat", final_c, ["c_n"], axis=0)

    graph_outputs = [
        ("output", tensor_type, [*x_shape[:2], directions * hidden]),
        ("h_n", tensor_type, states_shape),
        ("c_n", tensor_type, states_shape),
    ]
    from . import __version__

    opset_id = onnx.helper.make_opsetid("", opset)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.nodes,
            "numlstm",
            [onnx.helper.make_tensor_value_info(*value) for value in graph_inputs],
            [onnx.helper.make_tensor_value_info(*value) for value in graph_outputs],
            graph.initializers,
            doc_string=repr(lstm),
        ),
        opset_imports=[opset_id],
        producer_name="numlstm",
        producer_version=__version__,
        ir_version=onnx.helper.find_min_ir_version_for([opset_id]),
    )
    onnx.checker.check_model(model)
    if path is not None:
        onnx.save_model(model, path)
    return model


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------


class _Graph:
    """What :func:`from_onnx` needs to know of a graph: producers, constants, inputs."""

    def __init__(self, graph, onnx):
        self.onnx = onnx
        self.initializers = {init.name: init for init in graph.initializer}
        self.inputs = {value.name for value in graph.input} - set(self.initializers)
        self.nodes = list(graph.node)
        self.labels = {
            id(node): f"{node.op_type} node "
            + (repr(node.name) if node.name else f"#{n} (unnamed)")
            for n, node in enumerate(self.nodes)
        }
        self.producers = {}
        for node in graph.node:
            for output in node.output:
                self.producers[output] = node

    def label(self, node):
        """How messages name a node: ``LSTM node 'lstm_l0'``, or by position if unnamed."""
        return self.labels[id(node)]

    def weight(self, node, index, argument):
        """The initializer at input ``index`` of ``node`` as an array, or None if absent."""
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            return None
        if name not in self.initializers:
            raise ValueError(
                f"{self.label(node)}: input {argument} ({name!r}) must be an "
                "initializer (constant weights), but it is computed or fed at run time; "
                "from_onnx reads the weights from the graph's initializers"
            )
        return self.onnx.numpy_helper.to_array(self.initializers[name])

    def ancestors(self, name):
        """Every value ``name`` is computed from, stopping at LSTM outputs and graph inputs.

        Returns
        -------
        lstm_outputs : set of (node, output index)
        graph_inputs : set of str
        """
        lstm_outputs, graph_inputs, seen, stack = set(), set(), set(), [name]
        while stack:
            value = stack.pop()
            if value in seen or not value:
                continue
            seen.add(value)
            if value in self.inputs:
                graph_inputs.add(value)
            node = self.producers.get(value)
            if node is None:
                continue
            if node.op_type == "LSTM":
                lstm_outputs.add((id(node), list(node.output).index(value)))
            else:
                stack.extend(node.input)
        return lstm_outputs, graph_inputs


def _attributes(node, onnx):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class _Layer(NamedTuple):
    """One checked ONNX LSTM node, as a layer of the imported model."""

    node: object
    direction: str
    layout: int
    weights: _LayerWeights

    @property
    def dtype(self):
        return self.weights.W.dtype

    @property
    def hidden_size(self):
        return self.weights.R.shape[2]


def _check_lstm_node(node, graph, onnx):
    """Check that one LSTM node maps onto a numlstm layer."""
    attributes = _attributes(node, onnx)
    where = graph.label(node)
    direction = _text(attributes.get("direction", "forward"))
    layout = attributes.get("layout", 0)
    if direction not in ("forward", "reverse", "bidirectional") or layout not in (0, 1):
        raise ValueError(
            f"{where} has direction={direction!r}, layout={layout}: ONNX defines direction "
            "'forward', 'reverse' or 'bidirectional' and layout 0 or 1"
        )
    directions = 2 if direction == "bidirectional" else 1
    activations = [_text(a).lower() for a in attributes.get("activations", [])]
    if activations and activations != list(_DEFAULT_ACTIVATIONS) * directions:
        raise ValueError(
            f"{where} has activations {activations}: numlstm computes the gates with "
            f"{list(_DEFAULT_ACTIVATIONS)} per direction only"
        )
    for name in ("activation_alpha", "activation_beta"):
        if attributes.get(name):
            raise ValueError(
                f"{where} sets {name}={list(attributes[name])}: numlstm's activations take "
                "no parameters"
            )
    if "clip" in attributes:
        raise ValueError(
            f"{where} clips the gate inputs (clip={attributes['clip']}): numlstm does not clip"
        )
    if attributes.get("input_forget", 0):
        raise ValueError(
            f"{where} couples the input and forget gates (input_forget=1): numlstm's gates "
            "are independent"
        )
    for index, argument in ((4, "sequence_lens"), (5, "initial_h"), (6, "initial_c")):
        if index < len(node.input) and node.input[index] in graph.initializers:
            raise ValueError(
                f"{where}: input {argument} ({node.input[index]!r}) is a constant of the "
                f"graph; numlstm takes {argument} when it is called, not as a parameter"
            )
    weights = _LayerWeights(
        *(graph.weight(node, _LSTM_INPUTS.index(name), name) for name in _LayerWeights._fields)
    )
    _check_weight_shapes(where, weights, attributes.get("hidden_size"), directions)
    return _Layer(node, direction, layout, weights)


def _check_weight_shapes(where, weights, hidden_size, directions):
    W, R, B, P = weights
    if W.ndim != 3 or W.shape[0] != directions or W.shape[1] % 4:
        raise ValueError(
            f"{where}: W must be (num_directions={directions}, 4 * hidden_size, input_size), "
            f"got shape {W.shape}"
        )
    hidden = W.shape[1] // 4
    if hidden_size is not None and hidden_size != hidden:
        raise ValueError(
            f"{where}: attribute hidden_size={hidden_size} does not match W, whose shape "
            f"{W.shape} holds 4 * {hidden} gate rows"
        )
    if R.shape != (directions, 4 * hidden, hidden):
        raise ValueError(
            f"{where}: R must be (num_directions, 4 * hidden_size, hidden_size) = "
            f"{(directions, 4 * hidden, hidden)}, got shape {R.shape}"
        )
    if B is not None and B.shape != (directions, 8 * hidden):
        raise ValueError(
            f"{where}: B must be (num_directions, 8 * hidden_size) = "
            f"{(directions, 8 * hidden)}, got shape {B.shape}"
        )
    if P is not None and P.shape != (directions, 3 * hidden):
        raise ValueError(
            f"{where}: P must be (num_directions, 3 * hidden_size) = "
            f"{(directions, 3 * hidden)}, got shape {P.shape}"
        )
    for name, array in zip("WRBP", weights, strict=True):
        if array is not None and array.dtype != W.dtype:
            raise ValueError(f"{where}: {name} is {array.dtype}, W is {W.dtype}")
    if W.dtype not in (np.float32, np.float64):
        raise TypeError(f"{where}: weights must be float32 or float64, got {W.dtype}")


def _load_model(model_or_path, onnx):
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load_model(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    raise TypeError(
        "model_or_path must be an onnx.ModelProto or the path of an .onnx file, got "
        f"{type(model_or_path).__name__}"
    )


def _lstm_nodes(graph):
    """The graph's LSTM nodes in order; raise for a node that is neither LSTM nor glue."""
    nodes = []
    for node in graph.nodes:
        if node.op_type == "LSTM" and node.domain in ("", "ai.onnx"):
            nodes.append(node)
        elif node.op_type not in _GLUE_OPS or node.domain not in ("", "ai.onnx"):
            raise ValueError(
                f"the graph has {graph.label(node)} ({node.domain or 'ai.onnx'}."
                f"{node.op_type}), which from_onnx cannot map: it reads graphs of LSTM nodes "
                f"and the data movement between them ({', '.join(sorted(_GLUE_OPS))})"
            )
    if not nodes:
        raise ValueError("the graph has no LSTM node")
    return nodes


def _check_stacking(nodes, graph):
    """Check the LSTM nodes form one stack: each reads the Y of the one before, the first
    reads one graph input; return that input's name."""
    for previous, node in zip([None, *nodes], nodes, strict=False):
        lstm_outputs, graph_inputs = graph.ancestors(node.input[0])
        expected = set() if previous is None else {(id(previous), 0)}
        if lstm_outputs != expected or (previous is None and len(graph_inputs) != 1):
            reads = "one graph input" if previous is None else f"Y of {graph.label(previous)}"
            raise ValueError(
                f"{graph.label(node)}: its input X must be computed from {reads} only, "
                "as in a stack of LSTM layers; from_onnx cannot map this graph"
            )
        if previous is None:
            (x_name,) = graph_inputs
    return x_name


def _input_is_transposed(x_name, first, graph):
    """Whether the path from the graph input to the first node's X swaps time and batch."""
    swapped, value = False, first.input[0]
    while value != x_name:
        node = graph.producers[value]
        perm = list(_attributes(node, graph.onnx).get("perm", []))
        if node.op_type == "Transpose" and perm == [1, 0, 2]:
            swapped = not swapped
        elif node.op_type != "Identity":
            raise ValueError(
                f"{graph.label(node)} lies between the graph input {x_name!r} "
                "and the first LSTM node; from_onnx accepts only Identity and a Transpose "
                "that swaps the time and batch axes there"
            )
        value = node.input[0]
    return swapped


def _check_same(layers, what, graph):
    values = [getattr(layer, what) for layer in layers]
    if len(set(values)) > 1:
        found = ", ".join(
            f"{graph.label(n)}: {v}" for (n, *_), v in zip(layers, values, strict=True)
        )
        raise ValueError(f"the LSTM nodes must share one {what} to form a numlstm.LSTM: {found}")


def _check_layer_inputs(layers, graph):
    """Each layer must read as many features as the one before outputs."""
    for previous, layer in itertools.pairwise(layers):
        width = previous.weights.W.shape[0] * previous.hidden_size
        if layer.weights.W.shape[2] != width:
            raise ValueError(
                f"{graph.label(layer.node)}: W reads {layer.weights.W.shape[2]} features, but "
                f"the LSTM node before outputs num_directions * hidden_size = {width}"
            )


def _check_direction(layer, reverse_as_forward, graph):
    if layer.direction == "reverse" and not reverse_as_forward:
        raise ValueError(
            f"{graph.label(layer.node)} runs direction='reverse' only, which numlstm.LSTM "
            "cannot: it runs forward or bidirectionally. A reverse LSTM equals a forward one "
            "called on each sequence reversed in time; from_onnx(..., "
            "reverse_as_forward=True) imports it so (see numlstm.onnx.reverse_sequences)"
        )
    if layer.direction != "reverse" and reverse_as_forward:
        raise ValueError(
            "reverse_as_forward=True needs LSTM nodes with direction='reverse', got "
            f"direction={layer.direction!r}"
        )


def from_onnx(model_or_path, *, reverse_as_forward=False):
    """Import an ONNX graph of one or more ``LSTM`` nodes as a :class:`numlstm.LSTM`.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or str or os.PathLike
        The model, or the path of an ``.onnx`` file. Its LSTM nodes form a stack (node
        ``k`` reads the output ``Y`` of node ``k - 1``; the first reads a graph input);
        their ``W``, ``R`` and ``B`` are initializers. Beside them the graph may hold
        nodes that only move data (Transpose, Reshape, Concat, Slice, ...), as stacked
        and bidirectional layers need.
    reverse_as_forward : bool, default False
        numlstm runs forward or bidirectionally; it has no reverse-only direction. With
        True, a graph whose LSTM nodes all run ``direction="reverse"`` imports as a
        forward LSTM with the same weights, which reproduces the graph when called on
        each sequence reversed in time within its length
        (:func:`numlstm.onnx.reverse_sequences`),
        its ``output`` reversed back the same way; ``h_n`` and ``c_n`` need no change.

    Returns
    -------
    numlstm.LSTM
        In evaluation mode, with the nodes' dtype. ``batch_first`` is set if the nodes use
        ``layout=1`` or the graph transposes its input to time-major before the first
        node. The nodes' ``sequence_lens``, ``initial_h`` and ``initial_c`` become the
        ``lengths`` and ``hx`` arguments of a call. Without ``B`` the model has
        ``bias=False``; if only some nodes have ``B``, the others get zero biases. With
        peephole weights (input ``P``) the model has ``cell="peephole"``; if only some
        nodes have ``P``, the others get zero peephole weights.

    Raises
    ------
    ValueError
        For what numlstm cannot compute: activations other than sigmoid, tanh, tanh;
        ``clip``; ``input_forget``; a reverse-only direction (see ``reverse_as_forward``);
        weights that are not initializers; constant initial states or lengths; a
        ``hidden_size`` attribute that does not match ``W``; nodes of other types or
        LSTM nodes that do not form one stack. The message names the node.
    TypeError
        For an argument of the wrong type, or weights that are not float32 or float64.

    Notes
    -----
    The import checks each LSTM node and that the other nodes only move data; it trusts
    that they arrange ``Y``, ``Y_h`` and ``Y_c`` into the graph's outputs the usual way.
    Compare the imported model with the graph on an example input (onnxruntime or
    ``onnx.reference.ReferenceEvaluator``) when the graph comes from elsewhere.
    """
    onnx = _require_onnx()
    reverse_as_forward = check_bool(reverse_as_forward, "reverse_as_forward")
    model = _load_model(model_or_path, onnx)
    graph = _Graph(model.graph, onnx)
    nodes = _lstm_nodes(graph)
    x_name = _check_stacking(nodes, graph)
    layers = [_check_lstm_node(node, graph, onnx) for node in nodes]
    for what in ("direction", "layout", "dtype", "hidden_size"):
        _check_same(layers, what, graph)
    _check_layer_inputs(layers, graph)
    first = layers[0]
    _check_direction(first, reverse_as_forward, graph)

    bias = any(layer.weights.B is not None for layer in layers)
    peephole = any(layer.weights.P is not None for layer in layers)
    params = {}
    for k, layer in enumerate(layers):
        params.update(_layer_from_onnx(layer.weights, k, bias, peephole))
    lstm = LSTM(
        input_size=first.weights.W.shape[2],
        hidden_size=first.hidden_size,
        num_layers=len(layers),
        bias=bias,
        batch_first=(first.layout == 1) != _input_is_transposed(x_name, first.node, graph),
        bidirectional=first.direction == "bidirectional",
        dtype=first.dtype,
        cell="peephole" if peephole else "standard",
    )
    lstm.load_state_dict(params)
    return lstm.eval()


def reverse_sequences(x, lengths=None, *, batch_first=False):
    """Each sequence of a padded batch reversed in time within its length.

    For running a reverse-only ONNX LSTM imported with ``reverse_as_forward=True``:
    ``output = reverse_sequences(lstm(reverse_sequences(x, lengths), lengths=lengths)[0],
    lengths)``. Padded steps stay where they are.

    Parameters
    ----------
    x : numpy.ndarray
        ``(T, B, ...)``, or ``(B, T, ...)`` with ``batch_first``.
    lengths : sequence of int, optional
        Real steps of each sequence; all ``T`` by default.
    batch_first : bool, default False

    Returns
    -------
    numpy.ndarray
        A new array shaped as ``x``.
    """
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        raise TypeError(
            f"x must be a NumPy array of at least 2 dimensions (time and batch), got "
            f"{type(x).__name__} of shape {getattr(x, 'shape', None)}"
        )
    time_major = np.swapaxes(x, 0, 1) if check_bool(batch_first, "batch_first") else x
    steps, batch = time_major.shape[:2]
    lengths = [steps] * batch if lengths is None else [int(n) for n in lengths]
    if len(lengths) != batch or not all(0 <= n <= steps for n in lengths):
        raise ValueError(f"lengths must hold {batch} integers in [0, {steps}], got {lengths}")
    reversed_ = time_major.copy()
    for b, n in enumerate(lengths):
        reversed_[:n, b] = time_major[:n, b][::-1]
    return np.swapaxes(reversed_, 0, 1) if batch_first else reversed_
