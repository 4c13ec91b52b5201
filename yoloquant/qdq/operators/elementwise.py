"""Add / Mul of two activations (residual adds, SE-block scaling): both inputs and the output
get grids of their own (ORT: QLinearAdd / QLinearMul requantize). A Mul that is the second half
of a gated activation (SiLU, HardSwish) belongs to ``activation``. An Add or Mul with a constant
operand (the decode's grid arithmetic) is left float."""
from __future__ import annotations

from . import activation

OP_TYPES = ("Add", "Mul", "Sub")


def plan(node, ctx):
    if node.op_type == "Mul" and activation.gate_of(node, ctx) is not None:
        return activation.plan_gate_mul(node, ctx)
    kind = node.op_type.lower()
    if kind not in ctx.rules.ops or len(node.input) != 2 or any(ctx.is_const(t) for t in node.input):
        return None
    return {"inputs": list(node.input), "outputs": [node.output[0]] if ctx.rules.node_outputs else [],
            "share": []}
