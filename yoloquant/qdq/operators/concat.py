"""Concat: one grid for the inputs and the output, so the int8 concat is a copy (no requantization).

An input joins the shared grid only when nothing but grid-sharing ops (Concat, MaxPool, Resize)
reads it; an input that a conv (or anything else) also reads keeps its own grid, and the
runtime requantizes it (ORT's QLinearConcat does; it is one input of several)."""
from __future__ import annotations

OP_TYPES = ("Concat",)
SHARING_OPS = frozenset({"Concat", "MaxPool", "Resize"})


def plan(node, ctx):
    if "concat" not in ctx.rules.ops:
        return None
    inputs = [t for t in node.input if t and not ctx.is_const(t)]
    if len(inputs) != len([t for t in node.input if t]):
        return None  # a constant piece: leave it float
    exclusive = [t for t in inputs if all(r.op_type in SHARING_OPS for r in ctx.readers.get(t, []))]
    return {"inputs": inputs, "outputs": [node.output[0]] if ctx.rules.node_outputs else [],
            "share": [exclusive + [node.output[0]]]}
