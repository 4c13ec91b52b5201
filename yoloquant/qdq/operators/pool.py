"""Pooling. MaxPool only picks values: input and output share one grid and it runs on the codes.
(Global)AveragePool computes a mean: its own output grid (ORT: QLinear(Global)AveragePool)."""
from __future__ import annotations

OP_TYPES = ("MaxPool", "AveragePool", "GlobalAveragePool")


def plan(node, ctx):
    x, y = node.input[0], node.output[0]
    if node.op_type == "MaxPool":
        if "maxpool" not in ctx.rules.ops or len(node.output) > 1 and node.output[1]:
            return None  # the Indices output is not a quantizable value
        return {"inputs": [x], "outputs": [y] if ctx.rules.node_outputs else [], "share": [[x, y]]}
    if "avgpool" not in ctx.rules.ops:
        return None
    return {"inputs": [x], "outputs": [y] if ctx.rules.node_outputs else [], "share": []}
