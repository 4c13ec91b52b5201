"""Conv pairs that cross-layer equalization can rescale (Nagel et al. 2019, section 4.1).

A pair is a first Conv whose output channel i, after an elementwise activation, is read only
by Convs (the "second" convs) as their input channel i. Scaling channel i of the first conv's
weight and bias by 1/s_i and the second convs' input channel i by s_i leaves the network
unchanged when the activation is positively homogeneous (f(x/s) = f(x)/s for s > 0): identity
and ReLU. For SiLU and HardSwish (x * HardSigmoid(x)) it is an approximation whose cost is
measured (algorithm.py).

Second convs may be dense (group 1), depthwise, or grouped; several may read the tensor (the
same s_i goes into each). The scaled channels may also reach them through ops that commute with
a positive per-channel scale (PASS_THROUGH: pooling, ReLU, and a Mul by a tensor that does not
depend on the scaled ones): that is how an SE block reads its input (x * gate(GAP(x)): the
GAP's scale is undone by the SE's first conv, so the gate is unchanged). Not handled (reported
as the reason a conv is in no pair): a scaled tensor read by anything else (Concat, a residual
Add, a sigmoid, a graph output), a first conv whose weight is shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import onnx

# activations by their exactness under per-channel positive scaling
EXACT = ("identity", "relu")
PASS_THROUGH = ("GlobalAveragePool", "MaxPool", "AveragePool", "Relu")
APPROXIMATE = ("hardswish", "silu")


@dataclass(frozen=True)
class Pair:
    first: str  # Conv node name whose output channels are scaled by 1/s
    activation: str  # identity / relu / hardswish / silu
    middle: str  # the tensor the second convs read (after the activation)
    seconds: tuple  # Conv node names reading `middle`, whose input channels are scaled by s
    through: tuple = ()  # nodes between middle and seconds that pass the scale on (PASS_THROUGH, Mul)
    side: tuple = ()  # unscaled tensors those Muls multiply by (an SE gate)

    @property
    def exact(self) -> bool:
        return self.activation in EXACT

    def as_dict(self) -> dict:
        d = {"first": self.first, "activation": self.activation, "second": list(self.seconds)}
        if self.through:
            d["through"] = list(self.through)
        return d


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            if t:
                found.setdefault(t, []).append(node)
    return found


def _activation(out: str, by_tensor: dict, graph_outputs: set) -> tuple[Optional[str], Optional[str], str]:
    """(kind, tensor after it, why not) for the ops reading a conv output `out`."""
    users = by_tensor.get(out, [])
    if out in graph_outputs:
        return None, None, "its output is a graph output"
    if len(users) == 1 and users[0].op_type == "Relu":
        return "relu", users[0].output[0], ""
    if len(users) == 2:
        ops = {u.op_type: u for u in users}
        gate = ops.get("HardSigmoid") or ops.get("Sigmoid")
        mul = ops.get("Mul")
        if gate is not None and mul is not None and set(mul.input) == {out, gate.output[0]} \
                and [u.name for u in by_tensor.get(gate.output[0], [])] == [mul.name]:
            if gate.op_type == "HardSigmoid" and not _is_hardswish_gate(gate):
                return None, None, "HardSigmoid with alpha/beta other than HardSwish's"
            return ("hardswish" if gate.op_type == "HardSigmoid" else "silu"), mul.output[0], ""
    # anything else: the raw output itself, if its readers pass the scale on (_closure decides)
    return "identity", out, ""


def _is_hardswish_gate(node: onnx.NodeProto) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return abs(attrs.get("alpha", 0.2) - 1 / 6) < 1e-6 and abs(attrs.get("beta", 0.5) - 0.5) < 1e-6


def find_pairs(model: onnx.ModelProto) -> tuple[list[Pair], dict[str, str]]:
    """(pairs in graph order, {conv name: why its output is not equalizable}) for every Conv
    with a constant weight."""
    graph = model.graph
    by_tensor = readers(graph)
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    weight_users: dict[str, int] = {}
    for node in graph.node:
        for t in node.input[1:]:
            weight_users[t] = weight_users.get(t, 0) + 1
    pairs, why_not = [], {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        const = [t for t in node.input[1:] if t]
        if not const or not all(t in inits for t in const):
            why_not[node.name] = "its weight or bias is not a constant"
            continue
        if any(weight_users[t] > 1 for t in const):
            why_not[node.name] = "its weight or bias is shared with another node"
            continue
        kind, middle, reason = _activation(node.output[0], by_tensor, outputs)
        if kind is None:
            why_not[node.name] = reason
            continue
        found = _closure(middle, by_tensor, inits, outputs, weight_users)
        if isinstance(found, str):
            why_not[node.name] = f"its {kind} output {found}"
            continue
        pairs.append(Pair(node.name, kind, middle, *found))
    return pairs, why_not


def _closure(middle: str, by_tensor: dict, inits: set, outputs: set, weight_users: dict):
    """(second convs, pass-through nodes, side tensors) reached from `middle`, or why not."""
    scaled, stack, seconds, through, side = {middle}, [middle], [], [], []
    while stack:
        t = stack.pop()
        if t in outputs:
            return "reaches a graph output"
        for u in by_tensor.get(t, []):
            if u.op_type == "Conv" and u.input[0] == t and u.input[1] in inits \
                    and weight_users[u.input[1]] == 1 and t not in u.input[1:]:
                if u.name not in seconds:
                    seconds.append(u.name)
                continue
            if u.op_type in PASS_THROUGH and list(u.input[:1]) == [t]:
                pass
            elif u.op_type == "Mul" and len(u.input) == 2 and list(u.input).count(t) == 1:
                side.append(next(i for i in u.input if i != t))
            else:
                return f"is read by {u.op_type} (not a conv or an op the scale passes through)"
            if u.name not in through:
                through.append(u.name)
                scaled.add(u.output[0])
                stack.append(u.output[0])
    if not seconds:
        return "reaches no conv"
    if scaled & set(side):
        return "is multiplied by itself (the scale would not cancel)"
    return tuple(seconds), tuple(through), tuple(dict.fromkeys(side))


def pair_subgraph(model: onnx.ModelProto, pair: Pair) -> onnx.ModelProto:
    """The pair alone: first conv, its activation, the pass-through nodes and the second convs,
    reading the first conv's input (and the side tensors) as graph inputs, giving the second
    convs' outputs. Judging a pair on it keeps the
    other pairs' (approximate) rewrites out of its measurement."""
    from onnx import TensorProto, helper

    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    first = by_name[pair.first]
    members = [first]
    if pair.activation != "identity":
        by_tensor = readers(graph)
        act = by_tensor[first.output[0]]
        members += [n for n in graph.node if n in act or (
            n.op_type == "Mul" and any(n.input[k] in {o for a in act for o in a.output}
                                       for k in range(len(n.input))) and n.output[0] == pair.middle)]
    members += [by_name[s] for s in pair.through + pair.seconds]
    used = {t for n in members for t in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    inputs = [value(t) for t in (first.input[0],) + pair.side]
    sub = helper.make_graph([n for n in graph.node if n in members], "pair", inputs,
                            [value(by_name[s].output[0]) for s in pair.seconds], inits)
    out = helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out
