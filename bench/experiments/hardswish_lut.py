"""HardSwish as two int8 kernels on ONNX Runtime: the gate as a lookup table (issue 14).

ORT has no int8 HardSigmoid, so in our 'qlinear' HardSwish form the gate still runs in float
between a DQ and a Q. ORT's QLinearLeakyRelu is a 256-entry lookup table, and with alpha = 1 it
is the identity: its output grid's saturation is then the HardSigmoid clip. With the gate's
grid scale b / (128 a) and zero point 128, code c decodes (scale b / 128, zero point 0) to
clip(a x + b, 0, 255 / 256): HardSigmoid(x) = clip(a x + b, 0, 1), exact below 1 - 1/256.

Rewrites a layout saved with the 'qlinear' HardSwish form (bench/experiments/placements.py
--forms ort_hswish_qlinear): each DQ -> HardSigmoid -> Q -> DQ becomes DQ -> LeakyRelu(1) -> Q
-> DQ with those grids, which ORT fuses into QLinearLeakyRelu -> QLinearMul.

  python bench/experiments/hardswish_lut.py IN.onnx OUT.onnx
"""
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from yoloquant.qdq.graph import tensor_readers  # noqa: E402

GATE_ZERO_POINT = 128


def attribute(node, name, default):
    return next((a.f for a in node.attribute if a.name == name), default)


def rewrite(model: onnx.ModelProto) -> int:
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = tensor_readers(graph)
    count = 0
    for node in graph.node:
        if node.op_type != "HardSigmoid":
            continue
        source, after = producer.get(node.input[0]), readers.get(node.output[0], [])
        if source is None or source.op_type != "DequantizeLinear" or len(after) != 1 \
                or after[0].op_type != "QuantizeLinear":
            continue
        alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
        quant = after[0]
        dequants = readers.get(quant.output[0], [])
        if not dequants or any(d.op_type != "DequantizeLinear" for d in dequants):
            continue
        node.op_type = "LeakyRelu"
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("alpha", 1.0)])
        names = [f"{node.name}_lut_{k}" for k in ("q_scale", "q_zero", "dq_scale", "dq_zero")]
        graph.initializer.extend([
            numpy_helper.from_array(np.array(beta / (GATE_ZERO_POINT * alpha), np.float32), names[0]),
            numpy_helper.from_array(np.array(GATE_ZERO_POINT, np.uint8), names[1]),
            numpy_helper.from_array(np.array(beta / GATE_ZERO_POINT, np.float32), names[2]),
            numpy_helper.from_array(np.array(0, np.uint8), names[3])])
        quant.input[1], quant.input[2] = names[0], names[1]
        for dq in dequants:
            dq.input[1], dq.input[2] = names[2], names[3]
        count += 1
    read = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in read]  # the gates' old [0, 1] grids
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def main():
    model = onnx.load(sys.argv[1])
    print(f"rewrote {rewrite(model)} HardSigmoid gates into lookup tables")
    onnx.save(model, sys.argv[2])


if __name__ == "__main__":
    main()
