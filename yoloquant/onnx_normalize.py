"""Exact ONNX graph rewrites so that X2Paddle 1.6.0 can convert real YOLO exports.

Every rewrite keeps the model's numbers unchanged (ONNX Runtime output before == after); it only
re-expresses a pattern in a form x2paddle's op mapper and shape inference understand:

- ``drop_unit_pool_dilations``: MaxPool with ``dilations=[1, 1]`` (what PyTorch exports by
  default). x2paddle asserts the attribute is absent ("only dilations = 0 is supported").
- ``fold_shape_constants``: values computed from ``Shape``/``Size`` of tensors whose shape is
  static (e.g. YOLOv5's Resize ``sizes`` = Concat(Slice(Shape(x)), ...)) are evaluated once and
  stored as initializers; x2paddle needs such operands as constants.
- ``fill_resize_optional_inputs``: ``Resize(x, '', '', sizes)``. x2paddle drops empty input names
  when it wires the graph, so the 4th input is no longer at index 3 and the mapping fails; empty
  roi/scales initializers keep the positions (ONNX Runtime treats empty tensors as absent).
- ``split_to_slices``: opset >= 13 Split whose sizes come as an input. x2paddle's symbolic shape
  inference ignores that input and splits evenly (85 channels -> 3 x 28), which later breaks the
  conversion with ``KeyError: 0``; one Slice per output is the same computation.
- ``fold_constant_subgraphs``: any other chain of ops computed from constants alone (YOLOv6's
  anchor grid: Constant -> Expand -> Unsqueeze -> Concat -> Cast, partly in float64, and
  opset-13 Squeeze with an axes input) is evaluated once into an initializer. x2paddle would
  convert it into float64 Paddle ops (whose tensors Paddle's PTQ then gives float64 scales that
  Paddle Inference cannot load) and its symbolic shape inference stops at such a Squeeze
  ("Incomplete symbolic shape inference"). Chains that compute a Conv weight or bias are left
  as exported (the QDQ writer matches convs by their weights).
- ``sum_to_adds``: ``Sum`` of three or more inputs (RepVGG blocks exported before
  re-parameterisation: 3x3 + 1x1 + identity branch). x2paddle adds the first input again in
  place of every input after the second (x0 + x1 + x0); a chain of Adds is the same sum.

The model input must have a static shape (the folding relies on it): pass ``input_shape`` to
``normalize`` to pin dynamic dimensions, otherwise a ``ModelError`` asks for a fixed-size export.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from yoloquant.errors import ModelError

log = logging.getLogger("yoloquant")

# Ops whose output is not a pure function of their inputs: never folded.
_NOT_FOLDABLE = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
    "Multinomial", "Bernoulli", "Dropout",
}


# ----------------------------------------------------------------------------- loading / io
def load_onnx(path) -> onnx.ModelProto:
    """Load an ONNX file, raising ModelError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model not found: {path}; set model_dir in the config "
                         "(or pass the correct path)")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"cannot read ONNX model {path}: the file is corrupt or not an ONNX "
                         f"model ({type(exc).__name__}: {exc}); re-export or re-download it") \
            from exc
    # A protobuf parser accepts many byte strings; a model without a graph is not a model.
    if not model.graph.node or not model.graph.output:
        raise ModelError(f"cannot read ONNX model {path}: the file parsed but holds no graph "
                         "(corrupt or not an ONNX model); re-export or re-download it")
    return model


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Old exporters list initializers among the inputs too; those are not feeds.
    inits = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """Shape of a value as ints, -1 for unknown/symbolic dims; None if the rank is unknown."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                 for d in tt.shape.dim)


def describe_io(model: onnx.ModelProto):
    """Return ``(input_name, input_shape, output_names, output_shapes)``.

    Shapes are tuples of ints with -1 for a dimension that is dynamic or unknown. Output shapes
    the file does not declare are filled in by ONNX shape inference where possible.
    """
    inputs = _real_inputs(model.graph)
    if len(inputs) != 1:
        names = [vi.name for vi in inputs]
        raise ModelError(f"expected an ONNX detector with exactly one image input, found "
                         f"{len(inputs)}: {names}; export the model with a single input")
    inp = inputs[0]
    input_shape = _dims(inp) or ()
    output_names = [vi.name for vi in model.graph.output]
    output_shapes = [_dims(vi) for vi in model.graph.output]
    if any(s is None or -1 in s for s in output_shapes):
        inferred = _infer(model)
        known = {vi.name: _dims(vi) for vi in inferred.graph.output}
        known.update({vi.name: _dims(vi) for vi in inferred.graph.value_info})
        output_shapes = [s if s is not None and -1 not in s else (known.get(n) or s or ())
                         for n, s in zip(output_names, output_shapes)]
    return inp.name, tuple(input_shape), output_names, [tuple(s) for s in output_shapes]


# ----------------------------------------------------------------------------- helpers
def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"ONNX shape inference failed on this model ({exc}); check that the "
                         "model is valid with onnx.checker / re-export it") from exc


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _consumed_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node (subgraphs included) or returned by the graph."""
    used = {vi.name for vi in graph.output}
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            used |= _consumed_names(sub)
    return used


class _Names:
    """Hands out tensor/node names not yet present in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.taken = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant-node outputs (the operands x2paddle can read)."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and _is_default_domain(node) and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _remove_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    used = _consumed_names(graph)
    keep = [t for t in graph.initializer if t.name in used or t.name not in candidates]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    produced = {o for n in graph.node for o in n.output}
    keep = [vi for vi in graph.value_info if vi.name in produced]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


# ----------------------------------------------------------------------------- rewrites
def drop_unit_pool_dilations(model: onnx.ModelProto) -> int:
    """Remove ``dilations`` from MaxPool nodes when it is all ones (the default anyway)."""
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MaxPool" or not _is_default_domain(node):
            continue
        for i, attr in enumerate(node.attribute):
            if attr.name == "dilations" and all(v == 1 for v in attr.ints):
                del node.attribute[i]
                changed += 1
                break
    return changed


def fold_shape_constants(model: onnx.ModelProto) -> int:
    """Replace values derived from Shape/Size of static-shaped tensors by initializers.

    Returns the number of nodes removed. Only chains that involve a Shape/Size are folded, so
    ordinary constant arithmetic on weights is left as exported.
    """
    graph = model.graph
    inferred = _infer(model)
    static: dict[str, tuple[int, ...]] = {}
    elem_types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        dims = _dims(vi)
        if dims is not None and -1 not in dims:
            static[vi.name] = dims
        elem_types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        static[t.name] = tuple(t.dims)

    constant = {t.name for t in graph.initializer}
    const_nodes: dict[str, onnx.NodeProto] = {}  # output name -> node computing a constant
    shape_derived: set[str] = set()
    for node in graph.node:
        if not _is_default_domain(node) or node.op_type in _NOT_FOLDABLE or \
                any(True for _ in _subgraphs(node)):
            continue
        ins = [n for n in node.input if n]
        if node.op_type in ("Shape", "Size"):
            if node.input[0] not in static:
                continue
            shape_derived.update(node.output)
        elif node.op_type == "Constant":
            pass
        elif not ins or not all(n in constant for n in ins):
            continue
        elif any(n in shape_derived for n in ins):
            shape_derived.update(node.output)
        constant.update(node.output)
        for out in node.output:
            const_nodes[out] = node
    if not shape_derived:
        return 0

    # Frontier: shape-derived values read by a node that stays (or returned by the graph).
    # Nodes are keyed by their first output: protobuf wrapper objects have no stable id().
    folded = {const_nodes[n].output[0] for n in shape_derived}
    readers: set[str] = {vi.name for vi in graph.output}
    for node in graph.node:
        if node.output[0] not in folded:
            readers.update(n for n in node.input if n)
            for sub in _subgraphs(node):
                readers |= _consumed_names(sub)
    frontier = sorted(n for n in shape_derived if n in readers)
    if not frontier:
        return 0

    values = _evaluate_constants(graph, const_nodes, static, frontier, _opset(model) or 13)
    before = len(graph.node)
    keep = [n for n in graph.node if n.output[0] not in folded]
    del graph.node[:]
    graph.node.extend(keep)
    for name in frontier:
        value = values[name]
        if elem_types.get(name):  # the evaluator could widen a dtype; keep the graph's type
            value = value.astype(helper.tensor_dtype_to_np_dtype(elem_types[name]), copy=False)
        graph.initializer.append(numpy_helper.from_array(value, name))
    # The constant helpers (Constant, Floor(Constant), ...) that only fed the chain are unread now.
    _remove_dead_nodes(graph, {n.output[0] for n in const_nodes.values()})
    _remove_unused_initializers(graph, set(constant))
    _drop_stale_value_info(graph)
    return before - len(graph.node)


# A folded value above this many elements stays computed in the graph (e.g. a large
# ConstantOfShape), so folding never bloats the model file.
_MAX_FOLDED_ELEMENTS = 1 << 22
_WEIGHT_READERS = {"Conv": (1, 2), "ConvTranspose": (1, 2)}


def fold_constant_subgraphs(model: onnx.ModelProto) -> int:
    """Replace chains of ops computed from constants alone by initializers; returns the number
    of nodes removed. A chain is folded where a node that stays reads it; chains read as a
    Conv weight/bias, or returned as a graph output, are left as they are."""
    graph = model.graph
    constant = {t.name for t in graph.initializer}
    const_nodes: dict[str, onnx.NodeProto] = {}
    computed: set[str] = set()  # constants produced by a node other than Constant
    for node in graph.node:
        ins = [n for n in node.input if n]
        if not _is_default_domain(node) or node.op_type in _NOT_FOLDABLE or \
                any(True for _ in _subgraphs(node)) or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type != "Constant" and not (ins and all(n in constant for n in ins)):
            continue
        constant.update(node.output)
        for out in node.output:
            const_nodes[out] = node
            if node.op_type != "Constant":
                computed.add(out)
    weight_inputs = {node.input[i] for node in graph.node
                     for i in _WEIGHT_READERS.get(node.op_type, ()) if i < len(node.input)}
    outputs = {vi.name for vi in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.output and node.output[0] in const_nodes:
            continue
        for name in {n for n in node.input if n in computed}:
            readers.setdefault(name, []).append(node)
    frontier = sorted(n for n in readers if n not in weight_inputs and n not in outputs)
    if not frontier:
        return 0
    values = _evaluate_constants(graph, const_nodes, {}, frontier, _opset(model) or 13)
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in _infer(model).graph.value_info}
    names = _Names(graph)
    before = len(graph.node)
    for name in frontier:
        value = values[name]
        if value.size > _MAX_FOLDED_ELEMENTS:
            continue
        if elem_types.get(name):  # the evaluator could widen a dtype; keep the graph's type
            value = value.astype(helper.tensor_dtype_to_np_dtype(elem_types[name]), copy=False)
        folded = names(f"{name}_folded")
        graph.initializer.append(numpy_helper.from_array(value, folded))
        for node in readers[name]:
            for i, n in enumerate(node.input):
                if n == name:
                    node.input[i] = folded
    _remove_dead_nodes(graph, {n.output[0] for n in const_nodes.values()})
    _remove_unused_initializers(graph, constant)
    _drop_stale_value_info(graph)
    return before - len(graph.node)


def _evaluate_constants(graph, const_nodes, static, wanted, opset) -> dict[str, np.ndarray]:
    """Compute ``wanted`` from constants, with Shape/Size results substituted as Constants."""
    from onnx.reference import ReferenceEvaluator

    # Only the ancestors of the wanted values, in the graph's (topological) order.
    needed, stack = set(), list(wanted)
    while stack:
        name = stack.pop()
        node = const_nodes.get(name)
        if node is None or node.output[0] in needed:
            continue
        needed.add(node.output[0])
        if node.op_type not in ("Shape", "Size"):
            stack.extend(n for n in node.input if n)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not node.output or node.output[0] not in needed:
            continue
        if node.op_type in ("Shape", "Size"):
            shape = np.array(static[node.input[0]], dtype=np.int64)
            value = (np.array(int(np.prod(shape)), dtype=np.int64) if node.op_type == "Size"
                     else _shape_slice(node, shape))
            nodes.append(helper.make_node("Constant", [], [node.output[0]],
                                          value=numpy_helper.from_array(value)))
        else:
            nodes.append(node)
    read = {n for node in nodes for n in node.input if n}
    inits = [t for t in graph.initializer if t.name in read]
    sub = helper.make_graph(nodes, "shape_constants", [],
                            [helper.make_empty_tensor_value_info(n) for n in wanted], inits)
    sub_model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
    results = ReferenceEvaluator(sub_model).run(None, {})
    return {name: np.asarray(v) for name, v in zip(wanted, results)}


def _shape_slice(node: onnx.NodeProto, shape: np.ndarray) -> np.ndarray:
    # Shape-15 has optional start/end attributes (python-slice semantics, clamped).
    start, end = 0, None
    for attr in node.attribute:
        if attr.name == "start":
            start = attr.i
        elif attr.name == "end":
            end = attr.i
    return shape[start:end].astype(np.int64)


def _remove_dead_nodes(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop nodes among ``candidates`` (first output names) whose outputs nobody reads."""
    while True:
        used = _consumed_names(graph)
        keep = [n for n in graph.node
                if not n.output or n.output[0] not in candidates
                or any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


def fill_resize_optional_inputs(model: onnx.ModelProto) -> int:
    """Give Resize explicit empty ``roi``/``scales`` tensors instead of '' names.

    Only done when the operand actually used (scales or sizes) is a constant, which is the form
    x2paddle maps to ``paddle.nn.functional.interpolate`` with a fixed size/scale.
    """
    graph = model.graph
    consts = _constant_values(graph)
    names = _Names(graph)
    empty_name = None
    changed = 0
    for node in graph.node:
        if node.op_type != "Resize" or not _is_default_domain(node) or len(node.input) < 3:
            continue
        used = node.input[-1]
        if not used or used not in consts or all(node.input[i] for i in range(1, len(node.input))):
            continue
        if empty_name is None:
            empty_name = names("yoloquant_resize_empty")
            graph.initializer.append(
                numpy_helper.from_array(np.zeros((0,), dtype=np.float32), empty_name))
        for i in range(1, len(node.input) - 1):
            if not node.input[i]:
                node.input[i] = empty_name
        changed += 1
    return changed


def split_to_slices(model: onnx.ModelProto) -> int:
    """Rewrite Split with a constant ``split`` *input* (opset >= 13) into one Slice per output."""
    graph = model.graph
    consts = _constant_values(graph)
    names = _Names(graph)
    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in graph.node:
        if node.op_type != "Split" or not _is_default_domain(node) or len(node.input) < 2 \
                or not node.input[1] or node.input[1] not in consts:
            new_nodes.append(node)
            continue
        sizes = [int(v) for v in np.asarray(consts[node.input[1]]).reshape(-1)]
        if len(sizes) != len(node.output):
            new_nodes.append(node)  # malformed; leave it for the checker to report
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        base = node.name or node.output[0]
        axes = names(f"{base}_axes")
        graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
        start = 0
        for i, (size, out) in enumerate(zip(sizes, node.output)):
            end = start + size
            if out:
                s_name, e_name = names(f"{base}_start{i}"), names(f"{base}_end{i}")
                graph.initializer.append(
                    numpy_helper.from_array(np.array([start], np.int64), s_name))
                graph.initializer.append(
                    numpy_helper.from_array(np.array([end], np.int64), e_name))
                new_nodes.append(helper.make_node("Slice", [node.input[0], s_name, e_name, axes],
                                                  [out], name=names(f"{base}_slice{i}")))
            start = end
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        _remove_dead_nodes(graph, {n.output[0] for n in graph.node if n.op_type == "Constant"})
        _remove_unused_initializers(graph, set(consts))
    return changed


def sum_to_adds(model: onnx.ModelProto) -> int:
    """Rewrite ``Sum`` of three or more inputs into a chain of two-input Adds (same order)."""
    graph = model.graph
    names = _Names(graph)
    new_nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in graph.node:
        if node.op_type != "Sum" or not _is_default_domain(node) or len(node.input) < 3:
            new_nodes.append(node)
            continue
        base = node.name or node.output[0]
        acc = node.input[0]
        for i, term in enumerate(node.input[1:], start=1):
            last = i == len(node.input) - 1
            out = node.output[0] if last else names(f"{base}_partial{i}")
            new_nodes.append(helper.make_node("Add", [acc, term], [out], name=names(f"{base}_add{i}")))
            acc = out
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return changed


# Order matters: Resize's operands must be constants before its empty inputs are filled.
REWRITES: tuple[tuple[str, Callable[[onnx.ModelProto], int]], ...] = (
    ("drop_unit_pool_dilations", drop_unit_pool_dilations),
    ("fold_shape_constants", fold_shape_constants),
    ("fold_constant_subgraphs", fold_constant_subgraphs),
    ("fill_resize_optional_inputs", fill_resize_optional_inputs),
    ("split_to_slices", split_to_slices),
    ("sum_to_adds", sum_to_adds),
)


# ----------------------------------------------------------------------------- entry point
def conv_constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move the ``Constant`` nodes that give a Conv its weight or bias into initializers (in
    place; returns how many moved). Some exporters (paddle2onnx, torch with constant folding
    off) write weights as Constant nodes; the Q/DQ writer and the weight matching read
    initializers. Same values, same names: an exact rewrite."""
    graph = model.graph
    wanted = {name for n in graph.node if n.op_type == "Conv" for name in n.input[1:3]}
    moved = []
    for node in graph.node:
        if (node.op_type == "Constant" and _is_default_domain(node) and node.output[0] in wanted
                and len(node.attribute) == 1 and node.attribute[0].name == "value"):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return len(moved)


def _fix_input_shape(model: onnx.ModelProto, input_shape: Sequence[int] | None) -> int:
    """Check the feed is static; pin its dynamic dims from ``input_shape`` if given."""
    inputs = _real_inputs(model.graph)
    changed = 0
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        current = _dims(vi)
        if current is None:
            current = ()
        if input_shape is not None and len(inputs) == 1:
            want = tuple(int(d) for d in input_shape)
            if len(want) != len(current) or any(c != -1 and c != w for c, w in zip(current, want)):
                raise ModelError(f"input_shape {list(want)} does not fit the ONNX input "
                                 f"'{vi.name}' of shape {_pretty(vi)}; give one value per "
                                 "dimension, matching the fixed ones")
            if any(w <= 0 for w in want):
                raise ModelError(f"input_shape {list(want)} must be all positive integers")
            for d, w in zip(dims, want):
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    d.Clear()
                    d.dim_value = w
                    changed += 1
        elif not current or -1 in current:
            raise ModelError(f"ONNX input '{vi.name}' has a dynamic or unknown shape "
                             f"{_pretty(vi)}; re-export the model with a fixed input size "
                             "(no dynamic axes) or pass input_shape, e.g. (1, 3, 640, 640)")
    return changed


def _pretty(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return "[?]"
    return "[" + ", ".join(d.dim_param or (str(d.dim_value) if d.dim_value else "?")
                           for d in tt.shape.dim) + "]"


def normalize(model: onnx.ModelProto, input_shape: Sequence[int] | None = None
              ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Apply all rewrites to a copy of ``model``; return it and the per-rewrite change counts.

    ``input_shape`` pins dynamic input dimensions (single-input models only); without it a model
    with a dynamic input raises ModelError. The result passes ``onnx.checker``.
    """
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the ONNX model is invalid ({exc}); re-export it (x2paddle "
                         "refuses models that fail onnx.checker)") from exc
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counts = {"fix_input_shape": _fix_input_shape(out, input_shape)}
    for name, rewrite in REWRITES:
        counts[name] = rewrite(out)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        # A failure here is a bug in a rewrite, not in the user's model: say so plainly.
        raise ModelError(f"normalized ONNX model failed the ONNX checker ({exc}); "
                         "please report this with the model") from exc
    changed = {k: v for k, v in counts.items() if v}
    log.info("normalized ONNX graph: %s", ", ".join(f"{k}={v}" for k, v in changed.items())
             or "no changes needed")
    return out, counts
