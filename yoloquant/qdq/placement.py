"""The placement pass: ask each node's handler which tensors to quantize and which must share a
grid, give every quantized tensor one grid, write one Q/DQ pair per tensor.

Where grids come from, in order: the image input's exact grid (``input_grids``); a conv input's
calibrated threshold T (the "anchor" of its group): [-T, T] as Paddle's int8 runtime uses it,
or, with ``rules.asymmetric_inputs``, [max(min, -T), T] from the group's measured minimum;
a conv output's calibrated grid (``ConvQuantParams.output_range`` / ``output_threshold``); the
fixed [0, 1] grid of a gate (Sigmoid, HardSigmoid); else the tensor's measured (min, max) on the
calibration images (``ranges``), 0 included. A group of tensors that must share a grid (MaxPool
/ Resize input and output, a Concat's inputs and output) takes its anchor's grid, or the union
of its members' ranges; two groups with different anchors are not merged (the op then
requantizes, or, for MaxPool / Resize, the runtime leaves it float).

What stays float: the detection head (the final convs' outputs and everything after them; with
``rules.int8_head_outputs`` a prediction conv read only by a Sigmoid requantizes its output), the
convs not given parameters, every tensor on the way into such a float conv (it is float
because its input cannot take 8 bits; with ``rules.pool_reads_rounded`` the way stops at a
GlobalAveragePool, whose mean of the rounded tensor the conv reads), and nodes whose op type
no handler knows (listed in the report: ``unknown_ops``).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from .graph import (_find_convs, downstream_nodes, final_convs, read_only_by_sigmoid,
                    tensor_readers)
from .legacy import check_model
from .operators import HANDLERS, SHAPE_OPS
from .operators import conv as conv_op
from .params import ACTIVATION_TYPES, QMAX, ConvQuantParams
from .rules import BackendRules, rules_for
from .writer import QdqWriter

log = logging.getLogger("yoloquant")


@dataclass
class PlacementReport:
    backend: str
    quantized_tensors: int = 0
    quantized_nodes: dict = field(default_factory=dict)  # op type -> nodes planned as int8
    unknown_ops: list = field(default_factory=list)  # names of nodes no handler knows (left float)
    protected_tensors: int = 0  # tensors kept float because they lead into a float conv
    unshared_concat_inputs: int = 0  # Concat inputs on a grid of their own (requantized)
    float_by_rule: list = field(default_factory=list)  # convs the rules run in float (speed)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "quantized_tensors": self.quantized_tensors,
                "quantized_nodes": dict(sorted(self.quantized_nodes.items())),
                "unknown_ops": self.unknown_ops, "protected_tensors": self.protected_tensors,
                "unshared_concat_inputs": self.unshared_concat_inputs,
                "float_by_rule": self.float_by_rule}


class _Context:
    """What handlers may look at."""

    def __init__(self, graph: onnx.GraphProto, rules: BackendRules, conv_params: dict):
        self.rules = rules
        self.conv_params = conv_params
        self.readers = tensor_readers(graph)
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consts = {i.name for i in graph.initializer} | {
            o for n in graph.node if n.op_type == "Constant" for o in n.output}
        # tensors computed from the image; the rest (grid / anchor arithmetic built from shapes,
        # e.g. YOLOv6's anchor points) count as constants: quantizing them would move the decode
        data = {i.name for i in graph.input} - self.consts
        for n in graph.node:  # topological order
            if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input):
                data.update(o for o in n.output if o)
        self.consts |= {o for n in graph.node for o in n.output if o and o not in data}

    def is_const(self, t: str) -> bool:
        return t in self.consts

    def conv_read_only_by(self, t: str, op_type: str) -> bool:
        p = self.producer.get(t)
        readers = self.readers.get(t, [])
        return p is not None and p.op_type == "Conv" and p.name in self.conv_params \
            and len(readers) == 1 and readers[0].op_type == op_type


class _Groups:
    """Union-find over tensors that must share a grid; a root carries at most one anchor."""

    def __init__(self, anchors: dict):
        self.parent: dict[str, str] = {}
        self.anchor = dict(anchors)  # root -> grid key

    def find(self, t: str) -> str:
        self.parent.setdefault(t, t)
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def merge(self, a: str, b: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        xa, xb = self.anchor.get(ra), self.anchor.get(rb)
        if xa is not None and xb is not None and xa != xb:
            return False
        self.parent[rb] = ra
        if xa is None and xb is not None:
            self.anchor[ra] = xb
        return True


def place_qdq(model: onnx.ModelProto, params: Sequence[ConvQuantParams], ranges: Mapping[str, tuple],
              backend: str = "onnxruntime", rules: Optional[BackendRules] = None,
              input_grids: Optional[Mapping[str, tuple]] = None) -> tuple[onnx.ModelProto, PlacementReport]:
    """A copy of ``model`` with int8 flowing between the convs in ``params`` (see the module
    doc), for ``backend``'s rules (or ``rules``). ``ranges``: {tensor: (min, max)} measured on
    calibration images (``calib.tensor_ranges``); ``input_grids``: {graph input: (scale, zero
    point)} for inputs whose values lie exactly on a grid (pixels k/255)."""
    rules = rules or rules_for(backend)
    check_model(model, rules.activation_type)
    out = copy.deepcopy(model)
    graph = out.graph
    convs = _find_convs(graph, list(params))
    pmap = {p.node_name: p for p in params}
    ctx = _Context(graph, rules, pmap)
    report = PlacementReport(rules.name)
    act_np, sym_zp = ACTIVATION_TYPES[rules.activation_type]

    head = final_convs(out)
    decode = downstream_nodes(out, head)
    region = [n for n in graph.node if n.name not in decode]
    # float convs given no parameters protect what leads into them; convs the rules run in
    # float for speed (image conv, head convs on ORT) do not: int8 flows up to them
    protected = _protected(graph, ctx, pmap)
    graph_inputs = {i.name for i in graph.input} | set(input_grids or {})
    # prediction convs that run in int8 end to end: output requantized, read by a Sigmoid only
    int8_heads = {n for n in head & set(pmap) if rules.int8_head_outputs
                  and pmap[n].output_range is not None
                  and read_only_by_sigmoid(convs[n].output[0], ctx.readers,
                                           {o.name for o in graph.output})}
    by_rule = {n for n in pmap if (not rules.int8_head_convs and n in head - int8_heads) or (
        not rules.int8_image_conv and convs[n].input[0] in graph_inputs)}
    for n in by_rule:
        del pmap[n]
    report.float_by_rule = sorted(by_rule)
    report.protected_tensors = len(protected)

    plans = _plan_nodes(region, ctx, head - int8_heads, report, protected)
    wanted, readers_wanting = _wanted(plans, ctx, {o.name for o in graph.output}, protected)
    grids = _grids(wanted, plans, pmap, ranges, input_grids or {}, rules, sym_zp, protected)
    # the scale each conv's int32 bias needs: that of its input's grid (read before rewiring)
    s_in = {node.name: grids[node.input[0]][0] if node.input[0] in grids
            else np.float32(pmap[node.name].input_threshold / QMAX)
            for node, _ in plans if node.op_type == "Conv"}
    for node, plan in plans:  # (before the writer renames outputs)
        if node.op_type == "Concat" and node.output[0] in grids:
            report.unshared_concat_inputs += sum(t in grids and grids[t] != grids[node.output[0]]
                                                 for t in plan["inputs"])
    w = QdqWriter(graph, act_np)
    report.quantized_tensors = _write_pairs(w, wanted, grids, readers_wanting, ctx, protected)
    for node, plan in plans:
        if node.op_type == "Conv":
            conv_op.quantize_weights(w, node, pmap[node.name], s_in[node.name], rules.quantize_bias)
        if any(t in grids for t in (*plan["inputs"], *plan["outputs"])):
            report.quantized_nodes[node.op_type] = report.quantized_nodes.get(node.op_type, 0) + 1
    w.finish()
    return out, report


def _plan_nodes(region, ctx: _Context, head: set, report: PlacementReport, protected: set) -> list:
    """[(node, plan)] from the handlers; unknown op types that touch the int8 flow are listed
    (not the shape arithmetic of a Resize)."""
    plans, unknown = [], []
    for node in region:
        handler = HANDLERS.get(node.op_type)
        if handler is None:
            if node.op_type not in SHAPE_OPS:
                unknown.append(node)
            continue
        plan = handler(node, ctx)
        if plan and node.op_type != "Conv" and protected & set(node.output):
            continue  # on the way into a float conv: the whole node stays float
        if plan:
            if node.name in head:  # prediction convs: int8 inputs, float outputs
                plan = dict(plan, outputs=[])
            plans.append((node, plan))
    touched = {t for _, plan in plans for t in (*plan["inputs"], *plan["outputs"])}
    report.unknown_ops = [n.name or f"<unnamed {n.op_type}>" for n in unknown
                          if touched & {*n.input, *n.output}]
    if report.unknown_ops:
        log.info("QDQ placement (%s): %d nodes of op types it does not know stay float: %s",
                 ctx.rules.name, len(report.unknown_ops), ", ".join(report.unknown_ops[:5]))
    return plans


def _wanted(plans, ctx: _Context, graph_outputs: set, protected: set):
    """The tensors to quantize, in plan order, and for each the int8 nodes reading it."""
    wanted, readers_wanting = [], {}
    for node, plan in plans:
        for t in plan["outputs"]:
            if t and not ctx.is_const(t) and t not in graph_outputs and t not in protected \
                    and t not in readers_wanting:
                wanted.append(t)
                readers_wanting[t] = []
        for t in plan["inputs"]:
            if t and not ctx.is_const(t) and t not in graph_outputs:
                if t not in readers_wanting:
                    wanted.append(t)
                    readers_wanting[t] = []
                readers_wanting[t].append(node)
    return wanted, readers_wanting


def _write_pairs(w: QdqWriter, wanted, grids, readers_wanting, ctx: _Context, protected: set) -> int:
    """One Q/DQ pair per wanted tensor that has a grid; returns how many were written."""
    written = 0
    for t in wanted:
        if t not in grids:
            continue
        scale, zp = grids[t][:2]
        # the exact image grid is uint8 (codes 0..255) whatever the rules' activation type
        dtype = np.uint8 if len(grids[t]) > 2 else None
        producer = ctx.producer.get(t)
        if producer is not None and t not in protected:
            w.requantize_output(producer, list(producer.output).index(t), scale, zp, act_np=dtype)
        else:  # a graph input, or a tensor a float conv reads too: only the int8 readers see Q/DQ
            readers = readers_wanting.get(t, [])
            if not readers:
                continue
            _, dq_out = w.qdq_pair(t, scale, zp, act_np=dtype)
            for r in readers:
                r.input[:] = [dq_out if name == t else name for name in r.input]
        written += 1
    return written


def _protected(graph: onnx.GraphProto, ctx: _Context, pmap: dict) -> set:
    """Tensors on the way into a float conv's input through non-Conv ops (they stay float: the
    conv is float because that tensor cannot take 8 bits), not past a GlobalAveragePool when
    ``rules.pool_reads_rounded``."""
    found = set()
    for node in graph.node:
        if node.op_type != "Conv" or node.name in pmap:
            continue
        stack = [node.input[0]]
        while stack:
            t = stack.pop()
            if t in found or ctx.is_const(t):
                continue
            found.add(t)
            p = ctx.producer.get(t)
            if p is None or p.op_type in ("Conv", "ConvTranspose") or (
                    p.op_type == "GlobalAveragePool" and ctx.rules.pool_reads_rounded):
                continue
            stack.extend(i for i in p.input if i)
    return found


def input_grid(threshold: float, low: Optional[float]) -> tuple:
    """(scale, zero point) of a conv input's asymmetric uint8 grid: [max(low, -T), T], T the
    calibrated threshold and ``low`` the tensor's measured minimum; when that reaches -T (or is
    unknown: None) the symmetric grid T/127, zero point 128, as without this rule."""
    t = float(threshold)
    if low is None or low <= -t:
        return np.float32(t / QMAX), 128
    lo = min(float(low), 0.0)
    scale = np.float32((t - lo) / 255)
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def _range_grid(lo: float, hi: float, symmetric: bool, sym_zp: int):
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        t = max(abs(lo), abs(hi))
        return (np.float32(t / QMAX), sym_zp) if t > 0 else None
    if hi - lo <= 0:
        return None
    scale = np.float32((hi - lo) / 255)
    return scale, int(np.clip(np.round(-lo / scale), 0, 255)) + (sym_zp - 128)


def _grids(wanted, plans, pmap, ranges, input_grids, rules, sym_zp, protected) -> dict:
    """{tensor: (scale, zero point)} for the wanted tensors (those with no grid source are skipped)."""
    anchors = {}
    conv_inputs: dict[str, float] = {}
    conv_outputs: dict[str, tuple] = {}
    fixed: dict[str, tuple] = {}
    low_zero: set = set()
    for node, plan in plans:
        if node.op_type == "Conv":
            p = pmap[node.name]
            x = node.input[0]
            conv_inputs[x] = max(conv_inputs.get(x, 0.0), float(p.input_threshold))
            g = conv_op.output_grid(p, sym_zp) if not rules.symmetric or p.output_range is None else None
            if g is not None and plan["outputs"]:
                conv_outputs[node.output[0]] = g
        fixed.update(plan.get("fixed", {}))
        low_zero.update(plan.get("low_zero", []))
    for t, thr in conv_inputs.items():
        anchors[t] = ("exact",) + tuple(input_grids[t]) if t in input_grids else ("thr", thr)
    groups = _Groups(anchors)
    # MaxPool / Resize first (their runtimes need equal grids), then Concat
    order = sorted(plans, key=lambda item: item[0].op_type == "Concat")
    for node, plan in order:
        for share in plan["share"]:
            members = [t for t in share if t and t not in protected]
            for t in members[1:]:
                groups.merge(members[0], t)  # refused when two different anchors meet
    members: dict[str, list] = {}
    for t in wanted:
        members.setdefault(groups.find(t), []).append(t)
    for t in list(groups.parent):
        r = groups.find(t)
        if t not in members.get(r, []):
            members.setdefault(r, []).append(t)

    grids = {}
    for root, ts in members.items():
        anchor = groups.anchor.get(root)
        grid = None
        if anchor is not None and anchor[0] == "exact":
            grid = (np.float32(anchor[1]), int(anchor[2]), "exact")
        elif anchor is not None and not rules.symmetric and any(t in low_zero for t in ts):
            # a Relu output read by a conv: [0, T] on all 256 codes, zero point 0 (ORT then drops
            # the Relu into the conv's requantization; T/127 with zero point 128 would keep it)
            grid = (np.float32(anchor[1] / 255), 0)
        elif anchor is not None and rules.asymmetric_inputs and not rules.symmetric:
            grid = input_grid(anchor[1], min((ranges[t][0] for t in ts if t in ranges), default=None))
        elif anchor is not None:
            grid = (np.float32(anchor[1] / QMAX), sym_zp)
        elif len(ts) == 1 and ts[0] in conv_outputs:
            grid = conv_outputs[ts[0]]
        else:
            spans = [fixed[t] for t in ts if t in fixed] or [ranges[t] for t in ts if t in ranges]
            if spans:
                lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
                if any(t in low_zero for t in ts):
                    lo = 0.0
                if any(t in fixed for t in ts) and not rules.symmetric:
                    grid = (np.float32((hi - lo) / 255), 0)  # [0, 1]: codes 0..255
                else:
                    grid = _range_grid(lo, hi, rules.symmetric, sym_zp)
        if grid is None:
            continue
        for t in ts:
            grids[t] = grid
    return grids
