"""Where a YOLO graph's detection head ends, read from the graph's structure (no node names).

Every YOLO export (v5, v6, v7, X) ends the same way: a few *prediction convs* (from which a graph
output is reachable without passing another Conv, ``qdq.final_convs``) followed by a decode
subgraph made of elementwise ops, reshapes and concats. What matters for quantization is what
the decode does to each prediction conv's output:

* **score convs**: every path to the output passes a squashing op (Sigmoid, ...). Objectness and
  class logits (YOLOX obj/cls, YOLOv6 cls), and YOLOv5 / YOLOv7 ``--grid`` whose box terms are
  sigmoid-bounded too (xy = (2 sigmoid(p) - 0.5 + grid) * stride). An input rounding error
  moves a score by at most its sigmoid slope.
* **regression convs**: some path reaches the output without one. YOLOX's ``reg_preds`` (raw
  output, decoded outside as exp(p) * stride), YOLOv6's distance regression (decoded in the
  graph by add/sub/mul with anchor points). Their outputs are box coordinates in grid units, and
  the decode multiplies them by the stride (exp for sizes): measured on YOLOX-nano, quantizing
  the inputs and weights of its 3 reg + 3 obj prediction convs alone (all else float) cost
  0.0055 mAP@0.5:0.95 on val2017_mini and 0.0085 on held-out train images, the largest
  single group in the model. They are 1x1 convs with a handful of output channels, so keeping
  them float costs nothing measurable.

``conv_producers`` and ``activation_after`` describe the other end of a conv: which convs feed
its input, and which activation follows its output (for choosing an output grid).
"""
from __future__ import annotations

from typing import Iterable, Optional

import onnx

from .qdq import final_convs, reaches_output, tensor_readers
from .qdq.graph import read_only_by_sigmoid

# Ops that bound their output whatever the input: a prediction passing one is a score.
SQUASHING_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "Tanh", "HardSigmoid"})


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def regression_convs(model: onnx.ModelProto, finals: Optional[Iterable[str]] = None) -> set[str]:
    """Prediction convs with a path to a graph output that passes no squashing op (and no Conv).

    ``finals`` defaults to ``qdq.final_convs(model)``.
    """
    graph = model.graph
    readers = tensor_readers(graph)
    outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in graph.node}
    # another conv, or a squashing op, ends a path: it is not raw regression
    blocked = {"Conv"} | SQUASHING_OPS
    return {name for name in (final_convs(model) if finals is None else finals)
            if reaches_output(by_name[name].output, readers, outputs, blocked)}


def conv_producers(model: onnx.ModelProto, conv_names: Iterable[str]) -> set[str]:
    """Convs whose output reaches the activation input of one of ``conv_names`` through non-Conv
    ops only (activations, Concat, MaxPool, Resize, Add, ...)."""
    graph = model.graph
    producer = _producers(graph)
    by_name = {n.name: n for n in graph.node}
    found = set()
    for name in conv_names:
        stack, seen = [by_name[name].input[0]], set()
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue  # graph input or initializer
            seen.add(t)
            node = producer[t]
            if node.op_type == "Conv":
                found.add(node.name)
            elif node.op_type != "ConvTranspose":  # a layer of its own (always float): stop
                stack.extend(node.input)
    return found


def activation_after(model: onnx.ModelProto, conv_name: str) -> Optional[str]:
    """"SiLU" (Sigmoid + Mul on the conv output), "Relu", "Sigmoid" (read only by a Sigmoid,
    through layout ops: a score prediction conv), or None when the conv output has other or
    several readers (then nothing is known about how its values are used)."""
    graph = model.graph
    readers = tensor_readers(graph)
    conv = next(n for n in graph.node if n.name == conv_name)
    y = conv.output[0]
    users = readers.get(y, [])
    if len(users) == 1 and users[0].op_type == "Relu":
        return "Relu"
    if read_only_by_sigmoid(y, readers, {o.name for o in graph.output}):
        return "Sigmoid"
    if len(users) == 2:
        sig = [u for u in users if u.op_type == "Sigmoid"]
        mul = [u for u in users if u.op_type == "Mul"]
        if len(sig) == 1 and len(mul) == 1 and sorted(mul[0].input) == sorted([y, sig[0].output[0]]) \
                and readers.get(sig[0].output[0]) == [mul[0]]:
            return "SiLU"
    return None
