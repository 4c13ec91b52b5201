"""The units learned weight rounding works on: single convs (AdaRound) or single-entry
single-exit regions of the ONNX graph (BRECQ / QDrop), found from the graph's structure or
given in the config (`regions`). Pure graph work: no data, no training (reconstruct.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ConfigError, ModelError
from .runtime import session_with_outputs

# ops a unit may contain: those reconstruct.py's small interpreter runs
SUPPORTED_OPS = {"Conv", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Add", "Concat", "MaxPool", "Relu",
                 "LeakyRelu"}
# the gate of a gated activation y * gate(y): SiLU (YOLOv5/X/v7), HardSwish as exported (YOLOv6-Lite)
GATES = ("Sigmoid", "HardSigmoid")


@dataclass
class Unit:
    """A layer or region: graph nodes run in order from `input` to `output`."""

    name: str
    nodes: list  # onnx.NodeProto, in graph order
    input: str
    output: str
    convs: list  # names of the quantized convs learned here
    stride: tuple = (1, 1)  # input pixels per output pixel
    margin: tuple = (0, 0)  # output pixels near a crop border that depend on pixels outside it
    in_shape: tuple = ()  # (C, H, W) of the input
    out_shape: tuple = ()


def graph_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _consumers(model: onnx.ModelProto) -> dict[str, list[int]]:
    readers: dict[str, list[int]] = {}
    for k, n in enumerate(model.graph.node):
        for t in set(n.input):
            readers.setdefault(t, []).append(k)
    return readers


def _closes(members: list[int], nodes, readers, graph_outputs: set) -> bool:
    """True if only the last member's output leaves the set (single exit)."""
    inside = set(members)
    last = nodes[members[-1]].output[0]
    for k in members:
        for t in nodes[k].output:
            if t == last:
                continue
            if t in graph_outputs or any(r not in inside for r in readers.get(t, [])):
                return False
    return len(nodes[members[-1]].output) == 1


def find_regions(model: onnx.ModelProto, quantized: Sequence[str], limit: int) -> list[list[int]]:
    """Node-index lists of single-entry single-exit regions, each with 1..limit convs.

    Greedy in graph order: a region starts at a quantized Conv not yet covered, then takes the
    following nodes that read only its own tensors (nodes that read none of them are parallel
    branches and are passed over), stopping at the first node that also reads an outside tensor
    (a merge with another branch), an op the interpreter does not run, or limit + 1 convs. It ends
    at the last point where a single tensor leaves it (a branch point stops being one once its
    consumers are inside). With limit 1 a region is a conv and its activation.
    """
    nodes = list(model.graph.node)
    consts = graph_constants(model)
    readers = _consumers(model)
    outs = {o.name for o in model.graph.output}
    qset = set(quantized)
    covered: set[int] = set()
    regions = []
    for i, n in enumerate(nodes):
        if i in covered or n.op_type != "Conv" or n.name not in qset or n.input[0] in consts:
            continue
        x_in = n.input[0]
        members, produced, convs, best = [], set(), 0, 0
        for j in range(i, len(nodes)):
            m = nodes[j]
            dyn = [t for t in m.input if t and t not in consts]
            if not any(t == x_in or t in produced for t in dyn):
                continue
            if j in covered or m.op_type not in SUPPORTED_OPS or not all(t == x_in or t in produced for t in dyn):
                break
            if m.op_type == "Conv":
                if convs == limit:
                    break
                convs += 1
            members.append(j)
            produced.update(m.output)
            if _closes(members, nodes, readers, outs):
                best = len(members)
        members = members[:best]
        covered.update(members)
        regions.append(members)
    return regions


def layer_units_indices(model: onnx.ModelProto, quantized: Sequence[str]) -> list[list[int]]:
    """One conv each, plus its gated activation (SiLU, HardSwish) when the conv output feeds only
    the gate and Mul(y, gate(y)), or its HardSwish node."""
    nodes = list(model.graph.node)
    readers = _consumers(model)
    outs = {o.name for o in model.graph.output}
    qset = set(quantized)
    units = []
    for i, n in enumerate(nodes):
        if n.op_type != "Conv" or n.name not in qset:
            continue
        y = n.output[0]
        users = readers.get(y, [])
        sig = [k for k in users if nodes[k].op_type in GATES]
        mul = [k for k in users if nodes[k].op_type == "Mul"]
        if len(users) == 1 and nodes[users[0]].op_type == "HardSwish" and y not in outs:
            units.append([i, users[0]])
        elif (len(users) == 2 and len(sig) == 1 and len(mul) == 1 and y not in outs
                and sorted(nodes[mul[0]].input) == sorted([y, nodes[sig[0]].output[0]])
                and readers.get(nodes[sig[0]].output[0], []) == mul
                and nodes[sig[0]].output[0] not in outs):
            units.append([i, sig[0], mul[0]])
        else:
            units.append([i])
    return units


def _shapes(model: onnx.ModelProto, names: set) -> dict[str, tuple]:
    """Shapes of the named tensors from one ONNX Runtime run on zeros (shape inference stops at
    YOLOv5's shape-computed Resize)."""
    graph_in = {i.name for i in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in graph_in:
            continue
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if not dims or any(v <= 0 for v in dims):
            raise ModelError(f"input {i.name!r} has a dynamic shape {dims}; reconstruction needs a model "
                             "exported at a fixed input size")
        feeds[i.name] = np.zeros(dims, dtype=np.float32)
    fetch = sorted(n for n in names if n not in feeds)
    values = session_with_outputs(model, fetch).run(fetch, feeds) if fetch else []
    shapes = {k: tuple(v.shape) for k, v in zip(fetch, values)}
    shapes.update({k: v.shape for k, v in feeds.items()})
    return shapes


def given_regions(model: onnx.ModelProto, regions: Sequence, quantized: Sequence[str]) -> list[tuple]:
    """(members, input, output) of regions given as [input tensor, output tensor] pairs (the
    config's `regions`): the nodes between the two, which must read nothing else."""
    nodes = list(model.graph.node)
    consts = graph_constants(model)
    producer = {t: k for k, n in enumerate(nodes) for t in n.output}
    found = []
    for pair in regions:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"config: each entry of regions must be [input, output] tensor names, got {pair!r}")
        x_in, y_out = pair
        if y_out not in producer:
            raise ConfigError(f"config: regions: no node of the ONNX graph produces {y_out!r}")
        members, stack = set(), [producer[y_out]]
        while stack:
            k = stack.pop()
            if k in members:
                continue
            members.add(k)
            if nodes[k].op_type not in SUPPORTED_OPS:
                raise ConfigError(f"config: region [{x_in}, {y_out}] contains {nodes[k].op_type} node "
                                  f"{nodes[k].name!r}; supported: {', '.join(sorted(SUPPORTED_OPS))}")
            for t in nodes[k].input:
                if not t or t == x_in or t in consts:
                    continue
                if t not in producer:
                    raise ConfigError(f"config: region [{x_in}, {y_out}] also reads {t!r}: {x_in!r} is not "
                                      "its only input")
                stack.append(producer[t])
        found.append((sorted(members), x_in, y_out))
    covered = {nodes[k].name for m, _, _ in found for k in m}
    # convs outside every given region are learned layer by layer
    for m in layer_units_indices(model, [q for q in quantized if q not in covered]):
        found.append((m, nodes[m[0]].input[0], nodes[m[-1]].output[0]))
    return sorted(found, key=lambda r: r[0][0])


def build_units(model: onnx.ModelProto, quantized: Sequence[str], level: str, limit: int,
                regions: Optional[Sequence] = None) -> list[Unit]:
    nodes = list(model.graph.node)
    consts = graph_constants(model)
    if level == "region-wise" and regions:
        spans = given_regions(model, regions, quantized)
    else:
        indices = (layer_units_indices(model, quantized) if level == "layer-wise"
                   else find_regions(model, quantized, limit))
        spans = [(m, nodes[m[0]].input[0], nodes[m[-1]].output[0]) for m in indices]
    shapes = _shapes(model, {t for members, _, _ in spans for k in members for t in
                             ([nodes[k].input[0]] if nodes[k].op_type in ("Conv", "MaxPool") else [])}
                     | {x for _, x, _ in spans} | {y for _, _, y in spans})
    qset = set(quantized)
    units = []
    for members, x_in, y_out in spans:
        ns = [nodes[k] for k in members]
        first = ns[0]
        if x_in not in shapes or y_out not in shapes or len(shapes[x_in]) != 4 or len(shapes[y_out]) != 4:
            raise ModelError(f"reconstruction needs 4-D tensors at the ends of a unit: {x_in!r} is "
                             f"{shapes.get(x_in)}, {y_out!r} is {shapes.get(y_out)}")
        _, c_in, h_in, w_in = shapes[x_in]
        _, c_out, h_out, w_out = shapes[y_out]
        if h_in % h_out or w_in % w_out:
            raise ModelError(f"region {first.name} -> {ns[-1].name}: input {h_in}x{w_in} is not a multiple "
                             f"of output {h_out}x{w_out}")
        stride = (h_in // h_out, w_in // w_out)
        # conservative receptive-field radius, in input pixels, summed over every windowed op
        radius = [0, 0]
        for n in ns:
            if n.op_type in ("Conv", "MaxPool"):
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                k = attrs.get("kernel_shape")
                if k is None:  # Conv without kernel_shape: read the weight
                    k = list(consts[n.input[1]].shape[2:])
                dil = attrs.get("dilations", [1, 1])
                sh = shapes.get(n.input[0])
                at = (h_in // sh[2], w_in // sh[3]) if sh and len(sh) == 4 else (1, 1)
                for a in range(2):
                    radius[a] += ((k[a] - 1) * dil[a]) * at[a]  # full kernel extent: covers any pads
        margin = tuple(math.ceil(radius[a] / stride[a]) for a in range(2))
        convs = [n.name for n in ns if n.op_type == "Conv" and n.name in qset]
        name = convs[0] if len(convs) == 1 else f"{convs[0]} .. {convs[-1]} ({len(convs)} convs)"
        units.append(Unit(name, ns, x_in, y_out, convs, stride, margin, (c_in, h_in, w_in), (c_out, h_out, w_out)))
    return units
