"""Activations. Gated ones, x * gate(x) (SiLU: Sigmoid, HardSwish: HardSigmoid), run in the form
the rules' ``gate`` names (see rules.py); the gate's output lies in [0, 1], a fixed grid (no
calibration). Relu after a conv is folded into the conv's requantization: the conv output gets
no Q/DQ and the Relu output a grid starting at 0 (ORT then drops the Relu: a Q whose zero point
is the lowest code clips at 0 already)."""
from __future__ import annotations

OP_TYPES = ("Sigmoid", "HardSigmoid", "Relu")
GATES = ("Sigmoid", "HardSigmoid")
UNIT = (0.0, 1.0)


def _gate_reads(g, x, ctx) -> bool:
    """g reads x, or x times a constant (equalization's exact form of a rescaled SiLU /
    HardSwish: x/s * gate(s * x/s), yoloquant/equalize), the product read by g alone."""
    if g.input[0] == x:
        return True
    scale = ctx.producer.get(g.input[0])
    return (scale is not None and scale.op_type == "Mul" and x in scale.input
            and all(t == x or ctx.is_const(t) for t in scale.input)
            and len(ctx.readers.get(g.input[0], [])) == 1)


def gate_of(mul, ctx):
    """The Sigmoid/HardSigmoid node g when ``mul`` computes x * g(x) (or x * g(c * x), c a
    constant), else None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for i in (0, 1):
        g = ctx.producer.get(mul.input[i])
        if g is not None and g.op_type in GATES and _gate_reads(g, mul.input[1 - i], ctx) \
                and len(ctx.readers.get(g.output[0], [])) == 1:
            return g
    return None


def _gate_mul(gate, ctx):
    readers = ctx.readers.get(gate.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Mul" and gate_of(readers[0], ctx) is gate:
        return readers[0]
    return None


def plan(node, ctx):
    rules = ctx.rules
    if node.op_type == "Relu":
        if "relu" not in rules.ops or not rules.node_outputs:
            return None
        fused = ctx.conv_read_only_by(node.input[0], "Relu")
        return {"inputs": [] if fused else [node.input[0]], "outputs": [node.output[0]], "share": [],
                "low_zero": [node.output[0]]}
    kind = node.op_type.lower()
    if _gate_mul(node, ctx) is not None:  # the first half of a SiLU / HardSwish
        if rules.gate_form(node.op_type) != "qlinear" or kind not in rules.ops:
            return None
        return {"inputs": [node.input[0]], "outputs": [node.output[0]], "share": [],
                "fixed": {node.output[0]: UNIT}}
    if kind not in rules.ops or not rules.node_outputs:
        return None
    return {"inputs": [node.input[0]], "outputs": [node.output[0]], "share": [],
            "fixed": {node.output[0]: UNIT}}


def plan_gate_mul(mul, ctx):
    """The Mul of x * gate(x): quantized as a node only in the 'qlinear' form; in the 'float' form
    its output (what the next conv reads) is still quantized by that reader."""
    if ctx.rules.gate_form(gate_of(mul, ctx).op_type) != "qlinear" or "mul" not in ctx.rules.ops:
        return None
    return {"inputs": list(mul.input), "outputs": [mul.output[0]], "share": []}
