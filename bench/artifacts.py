"""The artifacts bench/speed.py compares, all from the same calibration images: ours (every
layout of yoloquant/qdq from one calibration, and the Paddle int8 program), ORT's
quantize_static and NNCF (ONNX and OpenVINO routes), each with the detection head kept float."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from yoloquant.config import Config

log = logging.getLogger("yoloquant.bench")


@dataclass
class Artifact:
    label: str  # "FP32", "INT8 yoloquant (Paddle PTQ avg)", ...
    precision: str
    onnx_path: Optional[Path] = None
    paddle_files: Optional[tuple] = None  # (model_file, params_file)
    ov_ir: Optional[Path] = None  # an OpenVINO IR (.xml), for OpenVINO only
    quant_seconds: Optional[float] = None
    notes: dict = field(default_factory=dict)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the detection head: the final convs (yoloquant.qdq.final_convs) and every node
    downstream of them (decode, concat). Every method keeps these float, as our flow does."""
    from yoloquant.qdq import final_convs

    graph = model.graph
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in set(n.input):
            readers.setdefault(i, []).append(n)
    finals = final_convs(model)
    names, stack = set(finals), [o for n in graph.node if n.name in finals for o in n.output]
    seen = set(stack)
    while stack:
        for r in readers.get(stack.pop(), []):
            names.add(r.name)
            for o in r.output:
                if o not in seen:
                    seen.add(o)
                    stack.append(o)
    unnamed = [n for n in graph.node if not n.name]
    if unnamed:  # ORT / NNCF exclude by node name: an unnamed head node could not be excluded
        log.warning("%d nodes have no name; they cannot be excluded from quantization", len(unnamed))
    return sorted(n for n in names if n)


def calibration_images(cfg: Config, onnx_path: str):
    """The exact images our flow calibrates on (same function, same count, same order)."""
    from yoloquant.ptq import calibration_set, load_images
    from yoloquant.runtime import OnnxRuntimeBackend
    from yoloquant.validator import preprocess_for

    probe = OnnxRuntimeBackend(onnx_path, threads=1)
    preprocess = preprocess_for(cfg, probe.input_shape)
    dataset = calibration_set(cfg, preprocess, cfg.PTQ.batch_nums * cfg.PTQ.batch_size)
    images, ids = load_images(dataset, cfg.workers)
    return images, ids, probe.input_name


def peer_input_model(model_path: str, sample: np.ndarray, input_name: str, work: Path) -> str:
    """The float model the peers quantize: per-channel Q/DQ need opset >= 13, so an older graph
    (YOLOX: opset 11) is converted first, as our flow does; its output is checked unchanged."""
    model = onnx.load(model_path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= 13:
        return model_path
    from yoloquant.ptq import upgrade_opset

    path = work / "fp32_opset13.onnx"
    onnx.save(upgrade_opset(model, sample, input_name), str(path))
    return str(path)


OUR_FORMS = {  # label suffix: (deploy_backend, rule overrides, runtimes it is timed on)
    "onnxruntime layout": ("onnxruntime", {}, ("onnxruntime", "openvino")),
    # the other gate forms, to compare by measurement: SiLU float, HardSwish int8
    "onnxruntime layout, gates flipped (SiLU float, HardSwish int8)": (
        "onnxruntime", {"gate": "float", "hardswish_gate": "qlinear"}, ("onnxruntime",)),
    "openvino layout": ("openvino", {}, ("openvino",)),
    "tensorrt layout (signed int8)": ("tensorrt", {}, ("onnxruntime", "openvino")),
}


def quantize_ours(cfg: Config, out_dir: Path) -> list[Artifact]:
    """One calibration (yoloquant.ptq.calibrate: Paddle PTQ, SNR choice of float convs), then
    the Paddle int8 program and our QDQ ONNX in every layout."""
    from yoloquant.deploy_onnx import exact_input_grids
    from yoloquant.ptq import PADDLE_MODEL, PADDLE_PARAMS, calibrate
    from yoloquant.qdq import place_qdq, rules_for, tensor_ranges

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cal = calibrate(cfg, out_dir)
    cal.tensor_ranges.update(tensor_ranges(cal.onnx_model, cal.images, cal.converted.onnx_input_name))
    seconds = time.perf_counter() - start
    skipped = {cal.paddle_to_onnx[w] for w in (cfg.skip_tensor_list or []) if w in cal.paddle_to_onnx}
    params = [p for p in cal.conv_params if p.node_name not in skipped]
    notes = {"steps_seconds": dict(cal.timer.seconds), "calibration_image_ids": cal.image_ids,
             "float_convs": dict(cal.float_reasons)}
    arts = [Artifact(f"INT8 yoloquant ({cal.algo}), Paddle int8 program", "int8",
                     paddle_files=(out_dir / PADDLE_MODEL, out_dir / PADDLE_PARAMS),
                     quant_seconds=seconds, notes=dict(notes, runtimes=["paddle"]))]
    for suffix, (backend, overrides, runtimes) in OUR_FORMS.items():
        t0 = time.perf_counter()
        rules = rules_for(backend, **overrides)
        model, report = place_qdq(cal.onnx_model, params, cal.tensor_ranges, rules=rules,
                                  input_grids=exact_input_grids(cal) if rules.exact_input else None)
        path = out_dir / f"model_int8_{backend}{'_gates_flipped' if overrides else ''}.onnx"
        onnx.save(model, str(path))
        arts.append(Artifact(f"INT8 yoloquant ({cal.algo}), {suffix}", "int8", onnx_path=path,
                             quant_seconds=seconds + time.perf_counter() - t0,
                             notes=dict(notes, runtimes=list(runtimes), placement=report.as_dict())))
    return arts


def quantize_ort(model_path: str, images, input_name: str, out_path: Path,
                 overrides: Optional[dict] = None,
                 label: str = "INT8 ORT quantize_static (MinMax)") -> Artifact:
    """ONNX Runtime's static quantizer: QDQ, U8 activations, per-channel S8 weights, MinMax,
    its default op types (Conv, Add, Concat, Mul, Sigmoid, MaxPool, Resize, ...) minus the head.
    ``overrides``: {tensor: (scale, zero point)} forced instead of MinMax (TensorQuantOverrides)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([{input_name: x[None]} for x in images])

        def get_next(self):
            return next(self._feeds, None)

    model_path = str(Path(model_path).resolve())  # the quantizer runs in a temporary folder
    out_path = Path(out_path).resolve()
    excluded = head_nodes(onnx.load(model_path))
    extra = None
    if overrides:
        extra = {"TensorQuantOverrides": {
            t: [{"scale": np.asarray(sc, np.float32), "zero_point": np.asarray(zp, np.uint8)}]
            for t, (sc, zp) in overrides.items()}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ortq_") as tmp:
        # the calibrator writes augmented models next to itself: keep them out of the repo
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(model_path, str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=excluded, extra_options=extra)
        finally:
            os.chdir(cwd)
    return Artifact(label, "int8", onnx_path=out_path, quant_seconds=time.perf_counter() - start,
                    notes={"excluded_head_nodes": len(excluded),
                           "overridden_tensors": len(overrides or {})})


def our_activation_scales(qdq: onnx.ModelProto) -> dict:
    """{tensor: (scale, zero point)} of the activation QuantizeLinear nodes of our QDQ ONNX that
    read a tensor of the float graph (conv inputs, SiLU outputs), not a renamed raw conv output
    (insert_qdq names those '<tensor>_float')."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    return {n.input[0]: (inits[n.input[1]].astype(np.float32), inits[n.input[2]])
            for n in qdq.graph.node
            if n.op_type == "QuantizeLinear" and not n.input[0].endswith("_float")}


def quantize_nncf(model_path: str, images, input_name: str, out_path: Path) -> Artifact:
    """NNCF post-training quantization of the ONNX model (its defaults: 'performance' preset,
    fast bias correction), head kept float through an ignored scope."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # it logs every node it leaves unquantized
    model = onnx.load(model_path)
    excluded = head_nodes(model)
    dataset = nncf.Dataset(images, lambda x: {input_name: x[None]})
    start = time.perf_counter()
    quantized = nncf.quantize(model, dataset, subset_size=len(images),
                              ignored_scope=nncf.IgnoredScope(names=excluded, validate=False))
    seconds = time.perf_counter() - start
    onnx.save(quantized, str(out_path))
    return Artifact("INT8 NNCF quantize (ONNX)", "int8", onnx_path=out_path, quant_seconds=seconds,
                    notes={"excluded_head_nodes": len(excluded), "nncf": nncf.__version__})


def quantize_nncf_openvino(model_path: str, images, out_xml: Path) -> Artifact:
    """NNCF's own route to OpenVINO: quantize the ov.Model read from the ONNX file (the ONNX
    route above gives a file OpenVINO mis-executes in int8, see the README). Head ignored."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)
    head = set(head_nodes(onnx.load(model_path)))
    start = time.perf_counter()
    model = ov.Core().read_model(model_path)
    ignored = [op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() in head]
    quantized = nncf.quantize(model, nncf.Dataset(images, lambda x: x[None]),
                              subset_size=len(images),
                              ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    seconds = time.perf_counter() - start
    ov.save_model(quantized, str(out_xml))
    return Artifact("INT8 NNCF quantize (OpenVINO model)", "int8", ov_ir=out_xml,
                    quant_seconds=seconds,
                    notes={"excluded_head_nodes": len(ignored), "nncf": nncf.__version__})


