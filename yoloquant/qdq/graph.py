"""Graph helpers shared by the placement pass: names, readers, reachability, Conv lookup."""
from __future__ import annotations

import difflib
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import onnx

from ..errors import ModelError
from .params import ConvQuantParams


def _unique_namer(graph: onnx.GraphProto):
    """Returns new_name(base) producing tensor/node names not yet used in the graph."""
    taken = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for n in graph.node:
        taken.update(n.input)
        taken.update(n.output)
        taken.add(n.name)

    def new_name(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    return new_name


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _find_convs(graph: onnx.GraphProto, params: Sequence[ConvQuantParams]) -> dict:
    by_name = {n.name: n for n in graph.node}
    name_count = Counter(n.name for n in graph.node)
    conv_names = [n.name for n in graph.node if n.op_type == "Conv"]
    found, seen = {}, set()
    for p in params:
        if p.node_name in seen:
            raise ModelError(f"Conv {p.node_name!r} is listed twice in the quantization parameters")
        seen.add(p.node_name)
        node = by_name.get(p.node_name)
        if node is None or node.op_type != "Conv":
            close = difflib.get_close_matches(p.node_name, conv_names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
                f"; the graph has {len(conv_names)} Conv nodes, e.g. {conv_names[:3]}")
            what = "is not a Conv node" if node is not None else "is not a node of the graph"
            kind = f" (it is a {node.op_type})" if node is not None else ""
            raise ModelError(f"{p.node_name!r} {what}{kind}{hint}")
        if name_count[p.node_name] > 1:
            raise ModelError(f"{p.node_name!r} names {name_count[p.node_name]} nodes of the graph; Conv names "
                             "must be unique to be quantized")
        found[p.node_name] = node
    return found


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (each node once)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in set(n.input):
            readers[i].append(n)
    return readers


def reaches_output(tensors: Iterable[str], readers: dict, outputs: set, blocked: set) -> bool:
    """Whether a graph output is reachable from ``tensors`` through nodes whose op type is not
    in ``blocked``."""
    stack, seen = list(tensors), set()
    while stack:
        t = stack.pop()
        if t in outputs:
            return True
        for r in readers.get(t, []):
            if r.op_type not in blocked:
                stack.extend(o for o in r.output if o not in seen)
                seen.update(r.output)
    return False


def final_convs(model: onnx.ModelProto) -> set[str]:
    """Names of the Convs from which a graph output is reachable without passing another Conv
    (YOLOv5: the three /model.24/m.* prediction convs)."""
    graph = model.graph
    readers = tensor_readers(graph)
    outputs = {o.name for o in graph.output}
    return {n.name for n in graph.node
            if n.op_type == "Conv" and reaches_output(n.output, readers, outputs, {"Conv"})}


def downstream_nodes(model: onnx.ModelProto, start_nodes: Iterable[str]) -> set[str]:
    """Names of the nodes reachable from the outputs of ``start_nodes`` (not including them)."""
    graph = model.graph
    readers = tensor_readers(graph)
    by_name = {n.name: n for n in graph.node}
    stack = [o for name in start_nodes for o in by_name[name].output]
    seen, found = set(stack), set()
    while stack:
        for r in readers.get(stack.pop(), []):
            found.add(r.name)
            for o in r.output:
                if o not in seen:
                    seen.add(o)
                    stack.append(o)
    return found


# ops that only move values: a tensor read through a chain of them is still the same values
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def read_only_by_sigmoid(tensor: str, readers: dict, graph_outputs=frozenset()) -> bool:
    """True when ``tensor`` reaches exactly one Sigmoid through single-reader layout ops and
    nothing else reads it, a graph output included (a YOLOv5 prediction conv: Reshape ->
    Transpose -> Sigmoid)."""
    t = tensor
    for _ in range(8):
        users = readers.get(t, [])
        if len(users) != 1 or t in graph_outputs:
            return False
        if users[0].op_type == "Sigmoid":
            return True
        if users[0].op_type not in LAYOUT_OPS:
            return False
        t = users[0].output[0]
    return False
