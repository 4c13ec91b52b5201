"""Variants of our QDQ ONNX, made by editing the saved file (yoloquant/qdq.py is not touched).

  python bench/experiments/qdq_variants.py inputs_only IN.onnx OUT.onnx

inputs_only: drop the Q/DQ pairs on Conv raw outputs and on the SiLU's Sigmoid output; keep the
  pairs on Conv inputs (activations, weights, bias). That is the layout OpenVINO and TensorRT
  expect (Conv + bias + SiLU fused, requantized into the next conv's input scale); ONNX Runtime
  then no longer fuses the convs (it needs a Q after each Conv).
"""
import logging
import sys
from collections import defaultdict

import onnx

log = logging.getLogger("yoloquant.bench")


def bypass_pairs(model: onnx.ModelProto, producer_types: set) -> tuple[onnx.ModelProto, int]:
    """Remove Q->DQ pairs whose Q reads a tensor made by a node of `producer_types`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    drop, rename = set(), {}
    for q in g.node:
        if q.op_type != "QuantizeLinear":
            continue
        p = producer.get(q.input[0])
        if p is None or p.op_type not in producer_types:
            continue
        dqs = readers[q.output[0]]
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if any(d.output[0] in graph_outputs for d in dqs):
            continue
        drop.add(id(q))
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = q.input[0]
    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return out, len(rename)


def inputs_only(model: onnx.ModelProto) -> onnx.ModelProto:
    m, n = bypass_pairs(model, {"Conv", "Sigmoid"})
    log.info("inputs_only: removed %d Q/DQ pairs on conv and sigmoid outputs", n)
    onnx.checker.check_model(m)
    return m


if __name__ == "__main__":
    kind, src, dst = sys.argv[1:4]
    model = onnx.load(src)
    onnx.save({"inputs_only": inputs_only}[kind](model), dst)
