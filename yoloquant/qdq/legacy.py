"""The conv-only placement (the artifact before deploy_backend existed); kept byte for byte
(tests/test_qdq_pin.py): Q/DQ around each listed Conv, plus the 8-bit SiLU rewrite."""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Sequence

import numpy as np
import onnx

from ..errors import ModelError
from .graph import _default_opset, _find_convs, final_convs, tensor_readers
from .operators import conv as conv_op
from .params import ACTIVATION_TYPES, MIN_OPSET, ConvQuantParams, _scale
from .writer import QdqWriter

log = logging.getLogger("yoloquant")


def check_model(model, activation_type: str) -> None:
    if activation_type not in ACTIVATION_TYPES:
        raise ModelError(f"activation_type must be one of {sorted(ACTIVATION_TYPES)}, got {activation_type!r}")
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(f"insert_qdq needs an onnx.ModelProto, got {type(model).__name__}")
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"the model uses ONNX opset {opset}; per-channel QuantizeLinear/DequantizeLinear "
                         f"need opset >= {MIN_OPSET} (convert it with onnx.version_converter first)")


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

    ``float_head_outputs`` (default): the outputs of the final Convs (the detection head's
    prediction convs) are not requantized even when a threshold is given; requantizing their
    box/score logits cost ~0.008 mAP on yolov5n.

    ``quantize_silu`` (default) also runs in 8 bits each SiLU (Sigmoid + Mul) that follows a Conv
    with a quantized output and feeds a listed Conv: the Sigmoid output gets a fixed [0, 1] grid
    and every reader of the Mul output is routed through the Q/DQ of the Conv input it feeds, so
    ORT runs QLinearSigmoid / QLinearMul. A SiLU feeding no listed Conv stays float.
    """
    check_model(model, activation_type)
    out = copy.deepcopy(model)
    graph = out.graph
    convs = _find_convs(graph, list(params))
    head = final_convs(out) if float_head_outputs else set()
    act_np, act_zp = ACTIVATION_TYPES[activation_type]
    w = QdqWriter(graph, act_np)
    act_pairs: dict[tuple, tuple] = {}  # (tensor, scale) -> (Q node, DQ output), shared by convs
    quantized_outputs: dict[str, str] = {}  # conv output tensor -> conv name

    for p in params:
        node = convs[p.node_name]
        x_name = node.input[0]
        conv_op.check_weight(node, w.inits)  # before the input pair is written
        s_in = _scale(p.input_threshold)
        key = (x_name, float(s_in))
        if key not in act_pairs:
            act_pairs[key] = w.qdq_pair(x_name, s_in, act_zp)
        node.input[0] = act_pairs[key][1]
        conv_op.quantize_weights(w, node, p, s_in, quantize_bias)
        grid = conv_op.output_grid(p, act_zp)
        if grid is not None and node.name not in head:
            y_name = node.output[0]
            w.requantize_output(node, 0, *grid)
            quantized_outputs[y_name] = node.name

    if quantize_silu:
        _quantize_silus(graph, quantized_outputs, act_pairs, w, activation_type)
    float_out = [p.node_name for p in params if p.node_name not in set(quantized_outputs.values())]
    if float_out:
        log.info("%d of %d quantized convs keep a float output (no output threshold, or final head "
                 "convs): ONNX Runtime runs them in float: %s", len(float_out), len(params),
                 ", ".join(float_out[:5]) + (" ..." if len(float_out) > 5 else ""))
    w.finish()
    return out


def _quantize_silus(graph, quantized_outputs: dict, act_pairs: dict, w: QdqWriter, activation_type: str):
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
        w.requantize_output(sig, 0, np.float32(1.0 / 255), sig_zp)
        q_node, dq_out = pairs[0]
        for reader in readers.get(m, []):  # our Q node is not in the graph yet: only original readers
            for k, name in enumerate(reader.input):
                if name == m:
                    reader.input[k] = dq_out
