"""The one object every operator handler writes through: new constants, Q/DQ pairs, node order.

New nodes are anchored to what they depend on (a constant-fed DQ before the node reading it, a
Q/DQ pair right after the node producing its tensor), so the rebuilt node list stays
topologically sorted without a sort.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from .graph import _unique_namer


class QdqWriter:
    def __init__(self, graph: onnx.GraphProto, act_np):
        self.graph = graph
        self.act_np = act_np
        self.inits = {i.name: i for i in graph.initializer}
        self.new_name = _unique_namer(graph)
        self.new_inits: list[TensorProto] = []
        self.before: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # by reader node name
        self.after_tensor: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.replaced_inits: set[str] = set()

    def add_const(self, base: str, array: np.ndarray) -> str:
        name = self.new_name(base)
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq_pair(self, tensor: str, scale, zero_point, out_name: Optional[str] = None, act_np=None):
        """Q(tensor) -> DQ, emitted right after ``tensor`` is produced; returns (Q node, DQ output)."""
        s = self.add_const(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        z = self.add_const(f"{tensor}_zero_point", np.array(zero_point, dtype=act_np or self.act_np))
        q_out = self.new_name(f"{tensor}_quantized")
        dq_out = out_name or self.new_name(f"{tensor}_dequantized")
        base = out_name or tensor
        q = helper.make_node("QuantizeLinear", [tensor, s, z], [q_out], name=self.new_name(f"{base}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out],
                              name=self.new_name(f"{base}_DequantizeLinear"))
        self.after_tensor[tensor].extend([q, dq])
        return q, dq_out

    def requantize_output(self, node: onnx.NodeProto, index: int, scale, zero_point, act_np=None):
        """node.output[index] -> Q -> DQ; the DQ takes over the original name (readers unchanged)."""
        y_name = node.output[index]
        raw = self.new_name(f"{y_name}_float")
        node.output[index] = raw
        return self.qdq_pair(raw, scale, zero_point, out_name=y_name, act_np=act_np)

    def const_dq(self, reader: onnx.NodeProto, q_values: np.ndarray, scale, zero_point, base: str,
                 axis: Optional[int] = None) -> str:
        """A constant int tensor + DequantizeLinear emitted just before ``reader``; returns the DQ output."""
        qv = self.add_const(f"{base}_quantized", q_values)
        sv = self.add_const(f"{base}_scale", np.asarray(scale, dtype=np.float32))
        zv = self.add_const(f"{base}_zero_point", zero_point)
        out = self.new_name(f"{base}_dequantized")
        dq = helper.make_node("DequantizeLinear", [qv, sv, zv], [out], name=self.new_name(f"{base}_DequantizeLinear"))
        if axis is not None:
            dq.attribute.extend([helper.make_attribute("axis", axis)])
        self.before[reader.name].append(dq)
        return out

    def finish(self, before_ops=("Conv",)) -> None:
        """Rebuild the node list: constant-fed DQs before their reader, the other new nodes right
        after the node producing their input (graph inputs / initializers first); drop the float
        initializers nobody reads any more (a weight shared with another op stays)."""
        graph = self.graph
        nodes = list(graph.node)
        del graph.node[:]

        def emit_after(tensor: str):
            for extra in self.after_tensor.pop(tensor, []):
                emit(extra)

        def emit(n: onnx.NodeProto, original: bool = False):
            if original and n.op_type in before_ops:
                graph.node.extend(self.before.pop(n.name, []))
            graph.node.append(n)
            for o in n.output:
                emit_after(o)

        produced = {o for n in nodes for o in n.output}
        for t in [t for t in list(self.after_tensor) if t not in produced]:
            emit_after(t)
        for n in nodes:
            emit(n, original=True)
        if self.after_tensor:  # a tensor nobody produces (should not happen): keep the graph consistent
            raise ModelError("internal error: Q/DQ inserted on tensors with no producer: "
                             f"{sorted(self.after_tensor)}")
        still_used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input} | \
            {o.name for o in graph.output}
        keep = [i for i in graph.initializer if i.name not in self.replaced_inits or i.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(keep + [i for i in self.new_inits if i.name in still_used])
