"""Insert QuantizeLinear/DequantizeLinear pairs into a float ONNX graph, on Conv layers only.

The deployable INT8 artifact is the original float graph plus Q/DQ around each listed Conv, with
scales calibrated elsewhere. Concat, Add, Resize and the detection head (its final convs' outputs
and the decoding) stay float: quantizing those costs accuracy. By default the SiLU between two
int8 convs runs in 8 bits too (see ``quantize_silu`` in insert_qdq), because without it the
float glue between the convs eats the int8 speed-up.

What ONNX Runtime (1.32, x86-64 CPU provider) needs to run such a Conv as an int8 kernel (its QDQ
Conv selector; ``ort_int8_report`` verifies the result):

* every input of the Conv comes from a DequantizeLinear: activation and weight (a float bias is
  fine: ORT 1.32 quantizes it to int32 itself; we write the int32 bias anyway, the form
  QLinearConv consumes, so the file does not depend on that pass);
* the Conv output goes to exactly one QuantizeLinear and nothing else, and is not a graph
  output. So each Conv needs an output scale too, although Paddle's int8 runtime never
  requantizes conv outputs;
* activations are **uint8** on x86 (int8 activations are only fused on ARM); weights int8.

ORT then rewrites DQ->Conv->Q into ``com.microsoft.QLinearConv`` (NHWC). The activation grid is
the symmetric int8 one (scale T/127); for uint8 the zero point is 128, giving exactly the same
representable values (plus one extra step, -128, on the negative side).

A DQ read by several nodes is duplicated by ORT (EnsureUniqueDQForNodeUnit). After an int8 Conv
the SiLU therefore reads two DQs, which also stops ORT fusing Sigmoid*Mul into one kernel: on
yolov5n the float glue costs about what the int8 convs save, hence ``quantize_silu``.
"""
from __future__ import annotations

import copy
import difflib
import logging
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError

log = logging.getLogger("yoloquant")

ACTIVATION_TYPES = {
    # name: (numpy type, zero point giving the symmetric int8 grid)
    "uint8": (np.uint8, 128),
    "int8": (np.int8, 0),
}
QMAX = 127  # symmetric int8 grid: scale = threshold / 127
MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13
INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class ConvQuantParams:
    """Calibrated quantization parameters of one Conv node.

    * ``input_threshold``: symmetric threshold T of the Conv's input activation (scale T/127).
    * ``weight_thresholds``: per output channel, shape (C_out,), or one value (per tensor);
      weight scale t/127.
    * ``quantized_weight``: int8 weight values already chosen by a rounding algorithm (e.g.
      AdaRound), same shape as the weight; used verbatim instead of round(w / scale).
    * ``output_threshold``: threshold of the Conv's raw output (before its activation). Needed
      for ONNX Runtime to run the Conv as an int8 kernel; without it the Conv gets Q/DQ on its
      inputs only and ORT runs it in float.
    * ``output_range``: (low, high), low <= 0 <= high, instead of ``output_threshold``: an
      asymmetric 8-bit grid (scale (high - low) / 255) for the Conv output. The output scale only
      exists for ORT (Paddle's int8 runtime does not requantize conv outputs), so it need not be
      symmetric; conv outputs followed by SiLU are mostly negative values that SiLU flattens.
    * ``bias_shift``: per output channel, added to the Conv's float bias before it is quantized
      (bias correction, see ``precision.layer_snr``); a Conv without bias gets one.
    """

    node_name: str
    input_threshold: float
    weight_thresholds: np.ndarray
    quantized_weight: Optional[np.ndarray] = None
    output_threshold: Optional[float] = None
    output_range: Optional[tuple] = None
    bias_shift: Optional[np.ndarray] = None

    def __post_init__(self):
        where = f"ConvQuantParams({self.node_name!r})"
        _check_threshold(self.input_threshold, f"{where}.input_threshold")
        if self.output_threshold is not None:
            _check_threshold(self.output_threshold, f"{where}.output_threshold")
        if self.output_range is not None:
            if self.output_threshold is not None:
                raise ModelError(f"{where}: give output_threshold or output_range, not both")
            try:
                lo, hi = (float(v) for v in self.output_range)
            except (TypeError, ValueError):
                raise ModelError(f"{where}.output_range must be (low, high), got {self.output_range!r}") from None
            # Zero must lie on the grid (ONNX zero points are integers), so the range spans 0.
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi and hi > lo):
                raise ModelError(f"{where}.output_range must satisfy low <= 0 <= high, low < high, "
                                 f"got {self.output_range!r}")
            object.__setattr__(self, "output_range", (lo, hi))
        w_t = np.asarray(self.weight_thresholds, dtype=np.float64).reshape(-1)
        if w_t.size == 0 or not np.all(np.isfinite(w_t)) or np.any(w_t < 0):
            raise ModelError(f"{where}.weight_thresholds must be finite and >= 0, got {self.weight_thresholds!r}")
        object.__setattr__(self, "weight_thresholds", w_t)
        if self.quantized_weight is not None:
            q = np.asarray(self.quantized_weight)
            if not np.array_equal(q, np.round(q)) or q.min(initial=0) < -128 or q.max(initial=0) > 127:
                raise ModelError(f"{where}.quantized_weight must hold integers in [-128, 127]")
            object.__setattr__(self, "quantized_weight", q.astype(np.int8))
        if self.bias_shift is not None:
            shift = np.asarray(self.bias_shift, dtype=np.float32).reshape(-1)
            if not np.all(np.isfinite(shift)):
                raise ModelError(f"{where}.bias_shift must be finite")
            object.__setattr__(self, "bias_shift", shift)


def _check_threshold(value, what: str) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value > 0):
        raise ModelError(f"{what} must be a finite number > 0, got {value!r}")


def _scale(threshold: float) -> np.float32:
    return np.float32(threshold / QMAX)


def _unique_namer(graph: onnx.GraphProto):
    """Returns new_name(base) producing tensor/node names not yet used in the graph."""
    taken = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    for n in graph.node:
        taken.update(n.input)
        taken.update(n.output)
        taken.add(n.name)

    def new_name(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    return new_name


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def _find_convs(graph: onnx.GraphProto, params: Sequence[ConvQuantParams]) -> dict:
    by_name = {n.name: n for n in graph.node}
    name_count = Counter(n.name for n in graph.node)
    conv_names = [n.name for n in graph.node if n.op_type == "Conv"]
    found, seen = {}, set()
    for p in params:
        if p.node_name in seen:
            raise ModelError(f"Conv {p.node_name!r} is listed twice in the quantization parameters")
        seen.add(p.node_name)
        node = by_name.get(p.node_name)
        if node is None or node.op_type != "Conv":
            close = difflib.get_close_matches(p.node_name, conv_names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
                f"; the graph has {len(conv_names)} Conv nodes, e.g. {conv_names[:3]}")
            what = "is not a Conv node" if node is not None else "is not a node of the graph"
            kind = f" (it is a {node.op_type})" if node is not None else ""
            raise ModelError(f"{p.node_name!r} {what}{kind}{hint}")
        if name_count[p.node_name] > 1:
            raise ModelError(f"{p.node_name!r} names {name_count[p.node_name]} nodes of the graph; Conv names "
                             "must be unique to be quantized")
        found[p.node_name] = node
    return found


def _quantize_weight(w: np.ndarray, p: ConvQuantParams):
    """int8 weight and its float32 scale (shape (C_out,) or scalar)."""
    c_out = w.shape[0]
    t = p.weight_thresholds
    if t.size not in (1, c_out):
        raise ModelError(f"Conv {p.node_name!r}: weight_thresholds has {t.size} values, the weight has "
                         f"{c_out} output channels (give {c_out} values or 1)")
    per_channel = t.size == c_out and t.size > 1
    dead = t <= 0
    # A zero threshold means "this channel quantizes to 0"; any positive scale then represents it,
    # and 1/127 keeps the int32 bias (bias / (s_in * s_w)) far from overflow.
    scale = np.where(dead, 1.0, t / QMAX).astype(np.float32)
    bshape = (-1,) + (1,) * (w.ndim - 1)
    if p.quantized_weight is not None:
        if p.quantized_weight.shape != w.shape:
            raise ModelError(f"Conv {p.node_name!r}: quantized_weight has shape {p.quantized_weight.shape}, "
                             f"the weight has {w.shape}")
        q = p.quantized_weight.astype(np.int8)
    else:
        # np.round = round half to even, as Paddle's quantizer does.
        q = np.clip(np.round(w.astype(np.float64) / scale.astype(np.float64).reshape(bshape)), -QMAX, QMAX)
        q = q.astype(np.int8)
    if dead.any():
        q = q.copy()
        q[np.broadcast_to(dead.reshape(bshape if per_channel else (1,) * w.ndim), q.shape)] = 0
    return q, (scale if per_channel else np.float32(scale[0])), per_channel


def insert_qdq(model: onnx.ModelProto, params: Sequence[ConvQuantParams], activation_type: str = "uint8",
               quantize_bias: bool = True, float_head_outputs: bool = True,
               quantize_silu: bool = True) -> onnx.ModelProto:
    """Returns a copy of ``model`` with Q/DQ inserted for each Conv in ``params``.

    For each listed Conv:

    * its activation input goes through QuantizeLinear -> DequantizeLinear (scale T/127, zero
      point 128 for ``"uint8"``, 0 for ``"int8"``); a tensor feeding several listed Convs with the
      same threshold gets one shared pair;
    * the float weight initializer is replaced by an int8 initializer + DequantizeLinear
      (per-channel on axis 0 when thresholds are per channel; zero point 0; values
      clip(round_half_even(w / scale), -127, 127) unless ``quantized_weight`` is given);
    * with ``quantize_bias`` the float bias becomes int32 (scale input_scale * weight_scale) +
      DequantizeLinear, the form QLinearConv consumes; otherwise the bias stays float (ORT 1.32
      then quantizes it itself while fusing);
    * with ``output_threshold`` set, the Conv output goes through Q -> DQ (the DQ output keeps the
      original tensor name, so consumers and graph outputs are unchanged). This is what lets ORT
      run the Conv as an int8 kernel.

    ``float_head_outputs`` (default): the outputs of the final Convs (those from which a graph
    output is reachable without passing another Conv: the detection head's prediction convs) are
    not requantized even when a threshold is given, so ORT runs those few Convs in float. Their
    raw outputs are box/score logits; requantizing them cost ~0.008 mAP on yolov5n (3 of 60 convs).

    ``quantize_silu`` (default) also runs in 8 bits each SiLU (Sigmoid + Mul) that follows a Conv
    with a quantized output and feeds a listed Conv: the Sigmoid output gets a fixed [0, 1] grid
    (scale 1/255, no calibration needed) and every reader of the Mul output is routed through the
    Q/DQ of the Conv input it feeds (the values that Conv sees), so ORT runs QLinearSigmoid /
    QLinearMul instead of dequantizing between int8 Convs. Measured on yolov5n: ~15% lower
    latency than without it, mAP unchanged within noise. A SiLU feeding no listed Conv stays float.

    Nothing else is touched: no Q/DQ on other ops or on graph inputs that no Conv consumes.
    """
    if activation_type not in ACTIVATION_TYPES:
        raise ModelError(f"activation_type must be one of {sorted(ACTIVATION_TYPES)}, got {activation_type!r}")
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"insert_qdq needs an onnx.ModelProto, got {type(model).__name__}")
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"the model uses ONNX opset {opset}; per-channel QuantizeLinear/DequantizeLinear "
                         f"need opset >= {MIN_OPSET} (convert it with onnx.version_converter first)")
    out = copy.deepcopy(model)
    graph = out.graph
    convs = _find_convs(graph, list(params))
    head = final_convs(out) if float_head_outputs else set()
    act_np, act_zp = ACTIVATION_TYPES[activation_type]
    inits = {i.name: i for i in graph.initializer}
    new_name = _unique_namer(graph)
    new_inits: list[TensorProto] = []
    # New nodes are anchored to what they depend on, so the rebuilt list stays topologically sorted:
    before: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # constant-fed DQs, before Conv (by name)
    after_tensor: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # emitted once the tensor exists
    act_pairs: dict[tuple, tuple] = {}  # (tensor, scale) -> (Q node, DQ output), shared by convs
    quantized_outputs: dict[str, str] = {}  # conv output tensor -> conv name (output Q/DQ inserted)
    replaced_inits: set[str] = set()

    def add_const(base: str, array: np.ndarray) -> str:
        name = new_name(base)
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    def qdq_pair(tensor: str, scale, zero_point, out_name: Optional[str] = None):
        """Q(tensor) -> DQ, emitted right after ``tensor`` is produced; returns (Q node, DQ output)."""
        s = add_const(f"{tensor}_scale", np.array(scale, dtype=np.float32))
        z = add_const(f"{tensor}_zero_point", np.array(zero_point, dtype=act_np))
        q_out = new_name(f"{tensor}_quantized")
        dq_out = out_name or new_name(f"{tensor}_dequantized")
        base = out_name or tensor
        q = helper.make_node("QuantizeLinear", [tensor, s, z], [q_out], name=new_name(f"{base}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=new_name(f"{base}_DequantizeLinear"))
        after_tensor[tensor].extend([q, dq])
        return q, dq_out

    for p in params:
        node = convs[p.node_name]
        x_name, w_name = node.input[0], node.input[1]
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if w_name not in inits:
            raise ModelError(f"Conv {node.name!r}: its weight {w_name!r} is not an initializer (computed at run "
                             "time or already quantized?); only constant weights can be quantized")
        w = numpy_helper.to_array(inits[w_name])
        if w.dtype != np.float32:
            raise ModelError(f"Conv {node.name!r}: weight {w_name!r} is {w.dtype}, only float32 is supported")

        # Activation input: one Q/DQ pair per (tensor, scale), shared by the convs reading it.
        s_in = _scale(p.input_threshold)
        key = (x_name, float(s_in))
        if key not in act_pairs:
            act_pairs[key] = qdq_pair(x_name, s_in, act_zp)
        node.input[0] = act_pairs[key][1]

        # Weight: int8 initializer + DQ.
        q_w, s_w, per_channel = _quantize_weight(w, p)
        axis = [helper.make_attribute("axis", 0)] if per_channel else []
        qw = add_const(f"{w_name}_quantized", q_w)
        sw = add_const(f"{w_name}_scale", np.asarray(s_w, dtype=np.float32))
        zw = add_const(f"{w_name}_zero_point", np.zeros(np.shape(s_w), dtype=np.int8))
        w_dq = new_name(f"{w_name}_dequantized")
        dq = helper.make_node("DequantizeLinear", [qw, sw, zw], [w_dq], name=new_name(f"{w_name}_DequantizeLinear"))
        dq.attribute.extend(axis)
        before[node.name].append(dq)
        node.input[1] = w_dq
        replaced_inits.add(w_name)

        if p.bias_shift is not None:
            if b_name is not None:
                replaced_inits.add(b_name)
            b_name = _shifted_bias(node, b_name, p.bias_shift, inits, w.shape[0], add_const)
        # Bias: int32 at scale s_in * s_w, the accumulator's scale, as QLinearConv consumes it.
        if b_name is not None and quantize_bias:
            if b_name not in inits:
                log.warning("Conv %s: bias %r is not an initializer; left float", node.name, b_name)
            else:
                b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
                s_b = (np.float32(s_in) * np.asarray(s_w, dtype=np.float32)).astype(np.float32)
                q_b = np.round(b / s_b.astype(np.float64))
                if np.any(np.abs(q_b) > INT32_MAX):
                    log.warning("Conv %s: int32 bias overflows and is clipped (tiny weight scales?)", node.name)
                q_b = np.clip(q_b, -INT32_MAX, INT32_MAX).astype(np.int32)
                qb = add_const(f"{b_name}_quantized", q_b)
                sb = add_const(f"{b_name}_scale", s_b if per_channel else np.float32(s_b))
                zb = add_const(f"{b_name}_zero_point", np.zeros(np.shape(s_b), dtype=np.int32))
                b_dq = new_name(f"{b_name}_dequantized")
                bdq = helper.make_node("DequantizeLinear", [qb, sb, zb], [b_dq], name=new_name(f"{b_name}_DequantizeLinear"))
                bdq.attribute.extend(axis)
                before[node.name].append(bdq)
                node.input[2] = b_dq
                replaced_inits.add(b_name)

        # Output: Conv -> Q -> DQ; the DQ takes over the original output name.
        if (p.output_threshold is not None or p.output_range is not None) and node.name not in head:
            if p.output_range is not None:
                lo, hi = p.output_range
                s_out = np.float32((hi - lo) / 255)
                zp_out = int(np.clip(np.round(-lo / s_out), 0, 255)) + (act_zp - 128)
            else:
                s_out, zp_out = _scale(p.output_threshold), act_zp
            y_name = node.output[0]
            raw = new_name(f"{y_name}_float")
            node.output[0] = raw
            qdq_pair(raw, s_out, zp_out, out_name=y_name)
            quantized_outputs[y_name] = node.name

    if quantize_silu:
        _quantize_silus(graph, quantized_outputs, act_pairs, qdq_pair, new_name, activation_type)
    float_out = [p.node_name for p in params if p.node_name not in set(quantized_outputs.values())]
    if float_out:
        log.info("%d of %d quantized convs keep a float output (no output threshold, or final head "
                 "convs): ONNX Runtime runs them in float: %s", len(float_out), len(params),
                 ", ".join(float_out[:5]) + (" ..." if len(float_out) > 5 else ""))

    # Rebuild the node list: constant-fed DQs before their Conv, the other new nodes right after the
    # node producing their input (graph inputs / initializers first).
    nodes = list(graph.node)
    del graph.node[:]

    def emit_after(tensor: str):
        for extra in after_tensor.pop(tensor, []):
            emit(extra)

    def emit(n: onnx.NodeProto, original: bool = False):
        if original and n.op_type == "Conv":
            graph.node.extend(before.pop(n.name, []))
        graph.node.append(n)
        for o in n.output:
            emit_after(o)

    produced = {o for n in nodes for o in n.output}
    for t in [t for t in list(after_tensor) if t not in produced]:
        emit_after(t)
    for n in nodes:
        emit(n, original=True)
    if after_tensor:  # a tensor nobody produces (should not happen): keep the graph consistent
        raise ModelError(f"internal error: Q/DQ inserted on tensors with no producer: {sorted(after_tensor)}")

    # Drop float initializers nobody reads any more (a weight shared with another op stays).
    still_used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in replaced_inits or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep + [i for i in new_inits if i.name in still_used])
    return out


def _shifted_bias(node: onnx.NodeProto, b_name: Optional[str], shift: np.ndarray, inits: dict,
                  channels: int, add_const) -> str:
    """Point ``node`` at a new float bias initializer = its bias (zeros if none) + ``shift``;
    returns the new name. A new initializer, so a bias shared with another node is untouched."""
    if shift.shape != (channels,):
        raise ModelError(f"Conv {node.name!r}: bias_shift has {shift.size} values for {channels} "
                         "output channels")
    if b_name is None:
        b = np.zeros(channels, np.float32)
    elif b_name not in inits:
        raise ModelError(f"Conv {node.name!r}: bias {b_name!r} is not an initializer; cannot "
                         "correct it")
    else:
        b = numpy_helper.to_array(inits[b_name]).astype(np.float32)
    corrected = (b + shift).astype(np.float32)
    name = add_const(f"{b_name or node.name + '_bias'}_corrected", corrected)
    inits[name] = numpy_helper.from_array(corrected, name)  # read when the bias is quantized
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name
    return name


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (each node once)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in set(n.input):
            readers[i].append(n)
    return readers


def reaches_output(tensors: Iterable[str], readers: dict, outputs: set, blocked: set) -> bool:
    """Whether a graph output is reachable from ``tensors`` through nodes whose op type is not
    in ``blocked``."""
    stack, seen = list(tensors), set()
    while stack:
        t = stack.pop()
        if t in outputs:
            return True
        for r in readers.get(t, []):
            if r.op_type not in blocked:
                stack.extend(o for o in r.output if o not in seen)
                seen.update(r.output)
    return False


def final_convs(model: onnx.ModelProto) -> set[str]:
    """Names of the Convs from which a graph output is reachable without passing another Conv
    (YOLOv5: the three /model.24/m.* prediction convs)."""
    graph = model.graph
    readers = tensor_readers(graph)
    outputs = {o.name for o in graph.output}
    return {n.name for n in graph.node
            if n.op_type == "Conv" and reaches_output(n.output, readers, outputs, {"Conv"})}


def _quantize_silus(graph, quantized_outputs: dict, act_pairs: dict, qdq_pair, new_name, activation_type: str):
    """The ``quantize_silu`` rewrite of insert_qdq (see there). Edits ``graph`` nodes in place."""
    readers = tensor_readers(graph)
    graph_outputs = {o.name for o in graph.output}
    pairs_by_tensor: dict[str, list] = defaultdict(list)
    for (tensor, _), (q_node, dq_out) in act_pairs.items():
        pairs_by_tensor[tensor].append((q_node, dq_out))
    # Sigmoid range is [0, 1]: a fixed grid, no calibration needed; 8 bits over [0, 1].
    sig_zp = 0 if activation_type == "uint8" else -128
    for y in quantized_outputs:
        users = readers.get(y, [])
        sig = [n for n in users if n.op_type == "Sigmoid"]
        mul = [n for n in users if n.op_type == "Mul"]
        if len(users) != 2 or len(sig) != 1 or len(mul) != 1:
            continue
        sig, mul = sig[0], mul[0]
        if sorted(mul.input) != sorted([y, sig.output[0]]) or readers.get(sig.output[0]) != [mul]:
            continue
        m = mul.output[0]
        pairs = pairs_by_tensor.get(m, [])
        # QLinearMul needs the Mul output to go to exactly one Q and not be a graph output.
        if len(pairs) != 1 or m in graph_outputs:
            continue
        s_out = sig.output[0]
        raw = new_name(f"{s_out}_float")
        sig.output[0] = raw
        qdq_pair(raw, np.float32(1.0 / 255), sig_zp, out_name=s_out)
        q_node, dq_out = pairs[0]
        for reader in readers.get(m, []):  # our Q node is not in the graph yet: only original readers
            for k, name in enumerate(reader.input):
                if name == m:
                    reader.input[k] = dq_out


# ---------------------------------------------------------------------------------------------
# Checking what ONNX Runtime really runs

INT8_CONV_OPS = {"QLinearConv", "ConvInteger"}


def _session(model_or_path, threads: int = 1, optimized_path: Optional[str] = None, level=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private exception types for bad models
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc


def ort_int8_report(onnx_path_or_model) -> dict:
    """What ORT's CPU provider runs after full graph optimisation (ORT_ENABLE_ALL).

    Returns ``conv_total`` (Conv-like nodes), ``conv_int8`` (QLinearConv in any domain, e.g. the
    NHWC ``com.microsoft.QLinearConv``, or ConvInteger), ``conv_float`` (Conv, FusedConv, NCHWc
    Conv...), ``quantize`` / ``dequantize`` (QuantizeLinear/DequantizeLinear left),
    ``op_counts`` ({"domain:op": n} for all nodes) and ``float_conv_names``.
    """
    model = onnx_path_or_model
    if not isinstance(model, onnx.ModelProto):
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"ONNX model not found: {model}")
    with tempfile.TemporaryDirectory(prefix="yoloquant_ort_") as tmp:
        opt_path = str(Path(tmp) / "optimized.onnx")
        _session(model, optimized_path=opt_path)
        opt = onnx.load(opt_path)
    counts = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in opt.graph.node)
    convs = [n for n in opt.graph.node if "Conv" in n.op_type]
    int8 = [n for n in convs if n.op_type in INT8_CONV_OPS]
    flt = [n for n in convs if n.op_type not in INT8_CONV_OPS]
    return {
        "conv_total": len(convs),
        "conv_int8": len(int8),
        "conv_float": len(flt),
        "quantize": sum(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in opt.graph.node),
        "dequantize": sum(n.op_type == "DequantizeLinear" for n in opt.graph.node),
        "op_counts": dict(sorted(counts.items())),
        "float_conv_names": [n.name for n in flt],
    }


def _random_feed(session, rng) -> dict:
    feed = {}
    for inp in session.get_inputs():
        if inp.type != "tensor(float)":
            raise ModelError(f"latency(): input {inp.name!r} is {inp.type}; only float inputs are supported")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feed[inp.name] = rng.random(shape, dtype=np.float32)
    return feed


def latency(*onnx_paths, runs: int = 30, threads: int = 2, warmup: int = 3, seed: int = 0) -> list[float]:
    """Median wall time (ms) of one inference per model, runs interleaved across the models.

    Interleaving spreads CPU frequency changes and noisy neighbours evenly over the models, so the
    medians are comparable. Inputs are random in [0, 1) with dynamic dimensions set to 1.
    """
    if not onnx_paths:
        raise ModelError("latency() needs at least one model")
    rng = np.random.default_rng(seed)
    sessions = [_session(p, threads=threads) for p in onnx_paths]
    feeds = [_random_feed(s, rng) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [float(np.median(t)) for t in times]


# ---------------------------------------------------------------------------------------------
# A quick abs-max calibration (for tests and experiments; real scales come from Paddle PTQ)

def conv_abs_max(model: onnx.ModelProto, batches: Iterable[dict], conv_names: Optional[Sequence[str]] = None) -> dict:
    """{conv name: (input abs-max, raw output abs-max, weight abs-max per output channel)} from
    running the float model with ONNX Runtime on ``batches`` (each a feed dict)."""
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv" and (conv_names is None or n.name in conv_names)]
    if conv_names is not None:
        _find_convs(graph, [_NameOnly(c) for c in conv_names])
    inits = {i.name: i for i in graph.initializer}
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    wanted = []
    for n in convs:
        for t in (n.input[0], n.output[0]):
            if t not in wanted:
                wanted.append(t)
    inputs = {i.name for i in probe.graph.input}
    for t in wanted:
        if t not in existing and t not in inputs:
            # Type/shape are left unknown: ORT accepts outputs declared without shape.
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
    sess = _session(probe, threads=2, level=_no_opt())
    out_names = [o.name for o in sess.get_outputs()]
    amax: dict[str, float] = defaultdict(float)
    n_batches = 0
    for feed in batches:
        n_batches += 1
        values = dict(zip(out_names, sess.run(None, feed)))
        values.update(feed)
        for t in wanted:
            amax[t] = max(amax[t], float(np.abs(values[t]).max()))
    if n_batches == 0:
        raise ModelError("conv_abs_max() got no calibration batches")
    result = {}
    for n in convs:
        if n.input[1] not in inits:
            raise ModelError(f"Conv {n.name!r}: weight {n.input[1]!r} is not an initializer")
        w = numpy_helper.to_array(inits[n.input[1]])
        result[n.name] = (amax[n.input[0]], amax[n.output[0]], np.abs(w.reshape(w.shape[0], -1)).max(axis=1))
    return result


def _no_opt():
    import onnxruntime as ort

    # Unoptimised graph: every intermediate tensor we asked for still exists.
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@dataclass(frozen=True)
class _NameOnly:
    node_name: str


def abs_max_params(model: onnx.ModelProto, batches: Iterable[dict], with_output: bool = True,
                   skip_output: Sequence[str] = ()) -> list[ConvQuantParams]:
    """ConvQuantParams for every Conv from abs-max calibration: input and (when ``with_output``)
    raw output thresholds, per-channel weight thresholds. Convs named in ``skip_output`` get no
    output threshold (ORT then runs them in float)."""
    stats = conv_abs_max(model, batches)
    params = []
    for name, (a_in, a_out, w_max) in stats.items():
        params.append(ConvQuantParams(
            node_name=name,
            input_threshold=max(a_in, 1e-8),
            weight_thresholds=w_max,
            output_threshold=max(a_out, 1e-8) if with_output and name not in skip_output else None,
        ))
    return params
