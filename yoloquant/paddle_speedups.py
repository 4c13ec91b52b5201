"""A scoped speed-up for Paddle 2.6's program rewrite after calibration (visible, tested).

Why: `PostTrainingQuantization._update_program` inserts ~900 quantize/dequantize pairs on a
YOLOv5n program (~5000 graph nodes) through `paddle.base.framework.IrGraph`, and three of its
helpers scan the whole graph on every call:

* `link_to` / `update_input_link` assert that each node they are given is in `graph.nodes()`,
  a fresh list of every node: ~4000 calls, each building that list;
* `all_persistable_nodes` walks every node with several C++ calls per node, and the insert
  pass calls it twice per pair to look up a scale by name.

That rewrite took 11.8 s of a 22 s 'avg' run on yolov5n (2 cores). Inside
`faster_ir_graph()` the link helpers skip the membership asserts (the passes only link nodes of
the graph they work on) and `all_persistable_nodes` answers from a per-graph cache that is
brought up to date by node id on every call, so its answer is what a full walk returns. Nothing
else changes and everything is restored on exit; tests/test_calibration.py checks that a
program rewritten with and without it is identical.
"""
from __future__ import annotations

from contextlib import contextmanager

from paddle.base.framework import IrGraph, IrVarNode


def _link_to(self, node_in, node_out):
    node_in.append_output(node_out)
    node_out.append_input(node_in)


def _update_input_link(self, old_input_node, new_input_node, op_node):
    old_input_node.remove_output(op_node)
    op_node.remove_input(old_input_node)
    new_input_node.append_output(op_node)
    op_node.append_input(new_input_node)
    op_node.rename_input(old_input_node.name(), new_input_node.name())


def _all_persistable_nodes(self):
    # node id -> IrVarNode (or None: not a persistable var); a node's kind never changes, so
    # only ids not seen before need the per-node calls
    cache = self.__dict__.setdefault("_persistable_by_id", {})
    current = {}
    for node in self.graph.nodes():
        key = node.id()
        if key not in cache:
            var = node.var() if node.is_var() else None
            cache[key] = IrVarNode(node) if var is not None and var.persistable() else None
        current[key] = cache[key]
    for key in [k for k in cache if k not in current]:  # removed nodes
        del cache[key]
    return {v for v in current.values() if v is not None}


_REPLACEMENTS = {"link_to": _link_to, "update_input_link": _update_input_link,
                 "all_persistable_nodes": _all_persistable_nodes}


@contextmanager
def faster_ir_graph():
    """IrGraph's whole-graph scans replaced as described in the module doc, for this block."""
    saved = {name: getattr(IrGraph, name) for name in _REPLACEMENTS}
    try:
        for name, fn in _REPLACEMENTS.items():
            setattr(IrGraph, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(IrGraph, name, fn)
