"""Resize (the neck's upsampling): picks or interpolates values within the input's range, so
input and output share one grid (ORT runs it on the uint8 codes when they do)."""
from __future__ import annotations

OP_TYPES = ("Resize", "Upsample")


def plan(node, ctx):
    if "resize" not in ctx.rules.ops:
        return None
    x, y = node.input[0], node.output[0]
    return {"inputs": [x], "outputs": [y] if ctx.rules.node_outputs else [], "share": [[x, y]]}
