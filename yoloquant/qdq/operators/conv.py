"""Conv: int8 weights (per output channel) and int32 bias; input and output grids come from the
calibration (ConvQuantParams), the placement decides whether the output is requantized."""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import ModelError
from ..params import INT32_MAX, QMAX, ConvQuantParams, _quantize_weight

log = logging.getLogger("yoloquant")

OP_TYPES = ("Conv",)


def plan(node: onnx.NodeProto, ctx) -> Optional[dict]:
    """Only the convs given ConvQuantParams are quantized; others stay float (not 'unknown')."""
    if node.name not in ctx.conv_params:
        return None
    out = {"inputs": [node.input[0]], "outputs": [], "share": []}
    # a conv read only by a Relu requantizes after the Relu (see activation.py)
    if ctx.rules.conv_outputs and not (
            "relu" in ctx.rules.ops and ctx.conv_read_only_by(node.output[0], "Relu")):
        out["outputs"] = [node.output[0]]
    return out


def output_grid(p: ConvQuantParams, act_zp: int):
    """(scale, zero point) of a conv's raw output, or None when it has no output grid."""
    if p.output_range is not None:
        lo, hi = p.output_range
        s_out = np.float32((hi - lo) / 255)
        return s_out, int(np.clip(np.round(-lo / s_out), 0, 255)) + (act_zp - 128)
    if p.output_threshold is not None:
        return np.float32(p.output_threshold / QMAX), act_zp
    return None


def check_weight(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    w_name = node.input[1]
    if w_name not in inits:
        raise ModelError(f"Conv {node.name!r}: its weight {w_name!r} is not an initializer (computed at run "
                         "time or already quantized?); only constant weights can be quantized")
    w = numpy_helper.to_array(inits[w_name])
    if w.dtype != np.float32:
        raise ModelError(f"Conv {node.name!r}: weight {w_name!r} is {w.dtype}, only float32 is supported")
    return w


def quantize_weights(writer, node: onnx.NodeProto, p: ConvQuantParams, s_in, quantize_bias: bool) -> None:
    """Weight -> int8 initializer + DQ; optional bias shift; bias -> int32 (scale s_in * s_w) + DQ."""
    inits = writer.inits
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = check_weight(node, inits)
    q_w, s_w, per_channel = _quantize_weight(w, p)
    axis = 0 if per_channel else None
    node.input[1] = writer.const_dq(node, q_w, s_w, np.zeros(np.shape(s_w), dtype=np.int8), w_name, axis)
    writer.replaced_inits.add(w_name)

    if p.bias_shift is not None:
        if b_name is not None:
            writer.replaced_inits.add(b_name)
        b_name = _shifted_bias(node, b_name, p.bias_shift, inits, w.shape[0], writer.add_const)
    # Bias: int32 at scale s_in * s_w, the accumulator's scale, as QLinearConv consumes it.
    if b_name is not None and quantize_bias:
        if b_name not in inits:
            log.warning("Conv %s: bias %r is not an initializer; left float", node.name, b_name)
            return
        b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
        s_b = (np.float32(s_in) * np.asarray(s_w, dtype=np.float32)).astype(np.float32)
        q_b = np.round(b / s_b.astype(np.float64))
        if np.any(np.abs(q_b) > INT32_MAX):
            log.warning("Conv %s: int32 bias overflows and is clipped (tiny weight scales?)", node.name)
        q_b = np.clip(q_b, -INT32_MAX, INT32_MAX).astype(np.int32)
        node.input[2] = writer.const_dq(node, q_b, s_b if per_channel else np.float32(s_b),
                                        np.zeros(np.shape(s_b), dtype=np.int32), b_name, axis)
        writer.replaced_inits.add(b_name)


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
