"""Quantize/Dequantize placement in a float ONNX graph (the deployable QDQ ONNX).

The shape is that of ONNX Runtime's quantizer: ``operators/`` holds one small handler per op
kind (conv, concat, pool, resize, elementwise, activation), ``placement.place_qdq`` is the one
pass that asks them which tensors to quantize and which must share a grid, ``rules.RULES`` holds
what each runtime fuses (onnxruntime / openvino / tensorrt) as data, and ``writer.QdqWriter``
writes the pairs. ``legacy.insert_qdq`` is the earlier conv-only placement, unchanged.
"""
from .calib import abs_max_params, conv_abs_max, tensor_ranges
from .check import INT8_CONV_OPS, latency, ort_int8_report
from .graph import downstream_nodes, final_convs, reaches_output, tensor_readers
from .legacy import insert_qdq
from .params import (ACTIVATION_TYPES, INT32_MAX, MIN_OPSET, QMAX, ConvQuantParams, _quantize_weight,
                     _scale)
from .placement import PlacementReport, place_qdq
from .rules import DEPLOY_BACKENDS, RULES, BackendRules, rules_for

__all__ = ["ACTIVATION_TYPES", "BackendRules", "ConvQuantParams", "DEPLOY_BACKENDS", "INT32_MAX",
           "INT8_CONV_OPS", "MIN_OPSET", "PlacementReport", "QMAX", "RULES", "abs_max_params",
           "conv_abs_max", "downstream_nodes", "final_convs", "insert_qdq", "latency",
           "ort_int8_report", "place_qdq", "reaches_output", "rules_for", "tensor_ranges", "tensor_readers",
           "_quantize_weight", "_scale"]
