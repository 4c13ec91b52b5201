"""The deployable QDQ ONNX of a calibration: the user's original ONNX graph with the scales Paddle
calibrated written in as Q/DQ pairs, laid out for the config's deploy_backend (yoloquant/qdq).

Kept apart from the PTQ job (ptq.py), which measures and decides; this module writes. Also the
grids known without calibration (the image input's exact uint8 grid) and the tensor ranges the
float fallback needs when the deployed layout puts conv inputs on asymmetric grids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import onnx

from .config import Config
from .provenance import Timer

if TYPE_CHECKING:  # ptq imports this module
    from .ptq import Calibration


def ranges_for_judge(cfg: Config, onnx_model: onnx.ModelProto, images: list, input_name: str,
                      timer: Timer) -> dict:
    """The float tensors' (min, max) when the deployed QDQ ONNX puts conv inputs on asymmetric
    grids (rules.asymmetric_inputs): the 8-bit SNR that decides float convs must simulate those
    grids, which need each input's minimum. Else {} (measured later, by build_qdq, if needed)."""
    from .qdq import rules_for, tensor_ranges

    if cfg.deploy_backend == "conv_only":
        return {}
    rules = rules_for(cfg.deploy_backend)
    if not rules.asymmetric_inputs or rules.symmetric:
        return {}
    with timer("glue_ranges"):
        return tensor_ranges(onnx_model, images, input_name)


def build_qdq(cal: Calibration, float_nodes=(), activation_type: str = "uint8",
              backend: Optional[str] = None) -> onnx.ModelProto:
    """The original ONNX graph with every calibrated Conv quantized except `float_nodes`, laid
    out for `backend` (default: the config's deploy_backend; yoloquant/qdq/rules.py).

    What leads into a float conv's input is not quantized (for ONNX Runtime that also keeps the
    producing conv float): the float conv is float because that tensor cannot take 8 bits.
    `activation_type` applies to the conv_only layout (the others fix it by runtime)."""
    from .qdq import place_qdq, rules_for

    backend = backend or cal.cfg.deploy_backend
    keep = set(float_nodes)
    params = [p for p in cal.conv_params if p.node_name not in keep]
    if backend == "conv_only":
        cal.placement = {"backend": backend}
        return _conv_only_qdq(cal, params, activation_type)
    rules = rules_for(backend)
    cal.measure_tensor_ranges()
    grids = exact_input_grids(cal) if rules.exact_input else {}
    model, report = place_qdq(cal.onnx_model, params, cal.tensor_ranges, rules=rules, input_grids=grids)
    cal.placement = dict(report.as_dict(), exact_input_tensors=sorted(grids))
    return model


def _conv_only_qdq(cal: Calibration, params: list, activation_type: str) -> onnx.ModelProto:
    from dataclasses import replace

    from .head import conv_producers
    from .qdq import insert_qdq

    quantized = {p.node_name for p in params}
    float_convs = [n.name for n in cal.onnx_model.graph.node
                   if n.op_type == "Conv" and n.name not in quantized]
    feeding_float = conv_producers(cal.onnx_model, float_convs)
    params = [replace(p, output_threshold=None, output_range=None) if p.node_name in feeding_float
              else p for p in params]
    return insert_qdq(cal.onnx_model, params, activation_type=activation_type)


# ops that move or select pixels without changing them (YOLOX's Focus: Slice + Concat)
_VALUE_PRESERVING = frozenset({"Slice", "Concat", "Reshape", "Transpose", "Split", "Identity",
                               "SpaceToDepth", "DepthToSpace"})


def exact_input_grids(cal: Calibration) -> dict:
    """{tensor: (scale, 0)} for the image input and the tensors made from it by value-preserving
    ops: after preprocessing every value is k * pixel_scale for an integer 0 <= k <= 255 (the
    letterbox pads with an integer too), so a uint8 grid of that scale holds them exactly and the
    first conv loses nothing to its input's quantization."""
    cfg = cal.cfg
    scale = cfg.pixel_scale if cfg.pixel_scale is not None else (1.0 if cfg.arch == "YOLOX" else 1 / 255)
    if not float(cfg.pad_value).is_integer() or not 0 <= cfg.pad_value <= 255:
        return {}
    graph = cal.onnx_model.graph
    consts = {i.name for i in graph.initializer}
    exact, changed = {cal.input_name}, True
    while changed:
        changed = False
        for n in graph.node:
            data = [i for i in n.input if i and i not in consts]
            if n.op_type in _VALUE_PRESERVING and data and all(i in exact for i in data) \
                    and not set(n.output) <= exact:
                exact.update(o for o in n.output if o)
                changed = True
    return {t: (np.float32(scale), 0) for t in exact}


