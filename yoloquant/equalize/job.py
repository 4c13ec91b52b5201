"""Equalization inside the post_quant / fine_tune / analysis jobs (yoloquant.ptq.calibrate)."""
from __future__ import annotations

import logging

import onnx

log = logging.getLogger("yoloquant")


def equalize_float_model(cfg, onnx_model: onnx.ModelProto, images: list, input_name: str):
    """Cross-layer equalization of the float model (config `equalization`; yoloquant/equalize)."""
    from .algorithm import equalize

    # ONNX Runtime's layouts requantize conv outputs; Paddle, OpenVINO and TensorRT do not
    result = equalize(onnx_model, images[:cfg.equalization_images], input_name, cfg.equalization,
                      output_grid=cfg.deploy_backend in ("onnxruntime", "conv_only"),
                      per_channel_weights=cfg.PTQ.weight_quantize_type == "channel_wise_abs_max")
    if cfg.equalization != "none":
        log.info("equalization (%s): %s", cfg.equalization, result.message)
    return result


def float_conv_explanations(cal, float_convs) -> dict:
    """{float conv: why equalization did not bring it into 8 bits}."""
    user = set(cal.user_skip.values())
    out = {}
    for conv in float_convs:
        why = cal.float_reasons.get(conv, "")
        if conv in user:
            out[conv] = "named in skip_tensor_list"
        elif why.startswith("regression"):
            out[conv] = "kept float by keep_regression_float (its output's use, not its input's range)"
        elif cal.equalization is not None:
            out[conv] = cal.equalization.why_float(conv)
    return dict(sorted(out.items()))


def original_sha(cal) -> str:
    from ..provenance import file_sha256

    if cal.equalization is None or not cal.equalization.applied:
        return cal.converted.sha256
    return file_sha256(cal.cfg.model_dir)
