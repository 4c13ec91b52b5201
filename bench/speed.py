"""Deployment speed benchmark: FP32 vs every INT8 artifact on every CPU runtime available.

  python bench/speed.py                                  # yolov5n + yolox_nano (assets) or demo
  python bench/speed.py --config_path configs/yolov5n_coco_mini.yaml --threads 2 --rounds 50

For one model + data config it builds, from the same 32 calibration images (the ones our flow
uses, yoloquant.ptq.calibration_set):

* our INT8 artifacts (yoloquant.ptq.quantize): the Paddle int8 program and the QDQ ONNX;
* ONNX Runtime's ``quantize_static`` (QDQ, uint8 activations, per-channel int8 weights, MinMax,
  detection head kept float);
* NNCF's ``nncf.quantize`` (when nncf is installed; head kept float), on the ONNX model and,
  when OpenVINO is installed, on the OpenVINO model read from it (NNCF's own OpenVINO route);
* "(proposal)" forms of our artifact that yoloquant/qdq.py could write (bench/experiments);

then times FP32 and each artifact on Paddle Inference (oneDNN fp32 / int8), ONNX Runtime and
OpenVINO (when installed: it reads QDQ ONNX), batch 1, fixed threads. Runs are interleaved
round-robin across all candidates, in a shuffled order each round, so machine noise hits all
alike; the table gives the median, p10 and p90, the ratio to the fastest FP32 runtime, mAP@0.5:0.95
of each artifact on that runtime (val set, all images), the quantization wall time and the int8
conv count (ONNX Runtime: fused QLinearConv after graph optimisation; OpenVINO: convolutions
executed in u8/i8).

Writes bench/results/speed_<config>.md and .json (with machine and package versions).
Latencies are wall time on a machine shared with other jobs: compare rows of one run.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# Paddle links Intel OpenMP, whose idle threads spin 200 ms after each run (KMP_BLOCKTIME): in an
# interleaved benchmark they would steal the CPU from whichever candidate runs next. Must be set
# before paddle is imported; 0 costs Paddle itself nothing measurable at batch 1 (see README).
os.environ.setdefault("KMP_BLOCKTIME", "0")
os.environ.setdefault("NNCF_DISABLE_TELEMETRY", "1")  # no network from a benchmark
os.environ.setdefault("OPENVINO_TELEMETRY_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import Config, load_config  # noqa: E402
from yoloquant.errors import YoloQuantError  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions, versions_of  # noqa: E402
from yoloquant.stats import CI_NOTE, paired_delta, resample_weights  # noqa: E402

log = logging.getLogger("yoloquant.bench")

DEFAULT_CONFIGS = ("configs/yolov5n_coco_mini.yaml", "configs/yolox_nano_coco_mini.yaml")
DEMO_CONFIG = "configs/demo.yaml"
EXTRA_PACKAGES = ("openvino", "nncf")


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- runtimes -----------------------------------------------------------------------------
class OrtBackend:
    """ONNX Runtime CPU session with explicit options (the project backend takes threads only)."""

    def __init__(self, path: Path, threads: int, spinning: bool = True, level: str = "all",
                 extra: Optional[dict] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        for key, value in (extra or {}).items():
            opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, tuple(inp.shape)
        self.output_name = self.session.get_outputs()[0].name
        self.name = "onnxruntime"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]


class OpenVinoBackend:
    """OpenVINO CPU plugin, latency mode, one stream, f32 precision for non-quantized layers.

    The inference precision is pinned to f32: on CPUs with bf16 support OpenVINO may otherwise
    run "FP32" models in bf16, which is a different (lossy) artifact.
    """

    def __init__(self, path: Path, threads: int, precision: str = "f32"):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        self.compiled = core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": precision})
        self.request = self.compiled.create_infer_request()
        self.input_shape = tuple(model.inputs[0].get_partial_shape().to_shape())
        self.name = "openvino"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()

    def int8_convs(self) -> tuple[int, int]:
        """(convolutions executed in u8/i8, all convolutions) of the compiled graph."""
        total = int8 = 0
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or info["layerType"].astype(str) != "Convolution":
                continue
            total += 1
            # runtimePrecision: the precision the kernel computes in (its input precision)
            if info["runtimePrecision"].astype(str).lower() in ("u8", "i8"):
                int8 += 1
        return int8, total


def paddle_backend(model_file: Path, params_file: Path, threads: int, int8: bool):
    from yoloquant.runtime import PaddleInferenceBackend, PaddleModelFiles

    return PaddleInferenceBackend(PaddleModelFiles(Path(model_file), Path(params_file)),
                                  int8=int8, threads=threads)


# ---- artifacts ----------------------------------------------------------------------------
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


def quantize_ours(cfg: Config, out_dir: Path) -> Artifact:
    from yoloquant.ptq import PADDLE_MODEL, PADDLE_PARAMS, QDQ_ONNX, quantize

    start = time.perf_counter()
    result = quantize(cfg, out_dir)
    seconds = time.perf_counter() - start
    label = f"INT8 yoloquant (Paddle PTQ {result.summary['algorithm']})"
    return Artifact(label, "int8", onnx_path=out_dir / QDQ_ONNX,
                    paddle_files=(out_dir / PADDLE_MODEL, out_dir / PADDLE_PARAMS),
                    quant_seconds=seconds,
                    notes={"steps_seconds": result.summary["seconds"],
                           "calibration_image_ids": result.summary["calibration"]["image_ids"]})


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


def proposal_artifacts(ours: Artifact, model_path: str, images, input_name: str,
                       work: Path, ort_ok: bool) -> list[Artifact]:
    """What yoloquant/qdq.py could write (see bench/experiments/README.md), made from our
    artifact without touching the package: (a) Q/DQ on conv inputs only, the form OpenVINO and
    TensorRT fuse (Conv+bias+SiLU, requantized into the next conv); (b) our conv-input scales
    plus Q/DQ on the glue (Add, Concat, MaxPool, Resize, every SiLU), the form ONNX Runtime
    runs end to end in int8 (ranges of the glue from MinMax on the same images)."""
    from experiments.qdq_variants import inputs_only

    arts = []
    start = time.perf_counter()
    onnx.save(inputs_only(onnx.load(str(ours.onnx_path))), str(work / "ours_inputs_only.onnx"))
    arts.append(Artifact("INT8 yoloquant, conv-input QDQ only (proposal)", "int8",
                         onnx_path=work / "ours_inputs_only.onnx",
                         quant_seconds=ours.quant_seconds + time.perf_counter() - start,
                         notes={"runtimes": ["openvino"]}))
    if ort_ok:
        overrides = {t: (s, z) for t, (s, z) in
                     our_activation_scales(onnx.load(str(ours.onnx_path))).items()}
        glue = quantize_ort(model_path, images, input_name, work / "ours_glue_int8.onnx",
                            overrides=overrides,
                            label="INT8 yoloquant scales + int8 glue (proposal)")
        glue.quant_seconds += ours.quant_seconds
        glue.notes["runtimes"] = ["onnxruntime"]
        arts.append(glue)
    return arts


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


# ---- candidates and interleaved timing ----------------------------------------------------
@dataclass
class Candidate:
    artifact: Artifact
    runtime: str
    make: Callable[[], object]  # builds the backend (lazily: only while it is measured)
    backend: object = None
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # process CPU ms (all threads) per run
    int8_convs: Optional[str] = None
    ort_report: Optional[dict] = None
    metrics: Optional[dict] = None
    error: Optional[str] = None
    result: object = None  # validator.EvalResult (its per-image matches give the intervals)


def candidates_for(artifacts: list[Artifact], fp32_paddle: Optional[tuple], threads: int,
                   runtimes: list[str], spinning: bool) -> list[Candidate]:
    cands = []
    for art in artifacts:
        only = art.notes.get("runtimes")
        if only:  # a proposal is timed on the runtime it is meant for
            runtimes_here = [r for r in runtimes if r in only]
        else:
            runtimes_here = runtimes
        if art.paddle_files and "paddle" in runtimes_here:
            files = art.paddle_files
            cands.append(Candidate(art, "paddle-inference (oneDNN int8)",
                                   lambda f=files: paddle_backend(*f, threads, int8=True)))
        if art.precision == "fp32" and fp32_paddle and "paddle" in runtimes_here:
            cands.append(Candidate(art, "paddle-inference (oneDNN fp32)",
                                   lambda f=fp32_paddle: paddle_backend(*f, threads, int8=False)))
        if art.onnx_path and "onnxruntime" in runtimes_here:
            cands.append(Candidate(art, "onnxruntime",
                                   lambda p=art.onnx_path: OrtBackend(p, threads, spinning)))
        if (art.onnx_path or art.ov_ir) and "openvino" in runtimes_here:
            cands.append(Candidate(art, "openvino",
                                   lambda p=art.ov_ir or art.onnx_path: OpenVinoBackend(p, threads)))
    return cands


def time_interleaved(cands: list[Candidate], image: np.ndarray, rounds: int, warmup: int,
                     seed: int = 0) -> None:
    """Round-robin over all candidates, shuffled each round; `warmup` untimed rounds first."""
    live = [c for c in cands if c.backend is not None]
    rng = np.random.default_rng(seed)
    for r in range(warmup + rounds):
        for i in rng.permutation(len(live)):
            c = live[i]
            c0, t0 = time.process_time(), time.perf_counter()
            c.backend(image)
            dt, dc = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
            if r >= warmup:
                c.times.append(dt)
                c.cpu_times.append(dc)
        if r >= warmup and (r - warmup + 1) % 10 == 0:
            log.info("timing: %d/%d rounds", r - warmup + 1, rounds)


def stats(times: list[float], cpu_times: Optional[list[float]] = None) -> dict:
    t = np.asarray(times)
    out = {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
           "p90_ms": float(np.percentile(t, 90)), "runs": int(t.size)}
    if cpu_times:
        # CPU time barely depends on how long other jobs kept us waiting for a core: the
        # load-independent cost (spinning threads count as busy, hence no spinning by default)
        out["cpu_median_ms"] = float(np.median(cpu_times))
    return out


# ---- one config ---------------------------------------------------------------------------
def bench_config(config_path: str, args) -> dict:
    cfg = load_config(config_path)
    if cfg.model_dir is None or not Path(cfg.model_dir).is_file():
        raise YoloQuantError(f"{config_path}: model {cfg.model_dir} not found")
    prepare_demo_data(cfg)
    runtimes = ["paddle", "onnxruntime"] + (["openvino"] if have("openvino") else [])
    runtimes = [r for r in runtimes if r in args.runtimes]
    work = Path(tempfile.mkdtemp(prefix="yoloquant_speed_"))
    log.info("artifacts in %s", work)
    try:
        return _bench_config(cfg, config_path, runtimes, work, args)
    finally:
        if not args.keep_artifacts:
            shutil.rmtree(work, ignore_errors=True)


def _bench_config(cfg: Config, config_path: str, runtimes: list[str], work: Path, args) -> dict:
    from yoloquant.evaluate import convert_for, evaluate_backend
    from yoloquant.qdq import ort_int8_report
    from yoloquant.validator import preprocess_for, val_dataset

    images, image_ids, input_name = calibration_images(cfg, cfg.model_dir)
    fp32 = Artifact("FP32", "fp32", onnx_path=Path(cfg.model_dir))
    artifacts = [fp32]
    ours = quantize_ours(cfg, work / "yoloquant")
    if [str(i) for i in ours.notes["calibration_image_ids"]] != [str(i) for i in image_ids]:
        raise YoloQuantError("the peers' calibration images differ from our flow's")
    artifacts.append(ours)
    peer_model = peer_input_model(cfg.model_dir, images[0][None], input_name, work)
    if "ort" in args.peers and not have("ml_dtypes"):
        # onnxruntime.quantization imports ml_dtypes, which onnxruntime does not declare
        log.warning("onnxruntime.quantization needs ml_dtypes (pip install ml_dtypes==0.5.4, "
                    "the last release for numpy 1.x): the ORT quantize_static row is skipped")
    elif "ort" in args.peers:
        artifacts.append(quantize_ort(peer_model, images, input_name, work / "ort_qdq.onnx"))
    if "nncf" in args.peers:
        if have("nncf"):
            artifacts.append(quantize_nncf(peer_model, images, input_name,
                                           work / "nncf_qdq.onnx"))
            if "openvino" in runtimes:
                artifacts.append(quantize_nncf_openvino(peer_model, images, work / "nncf_ov.xml"))
        else:
            log.warning("nncf is not installed: its row is skipped (pip install nncf)")
    if not args.no_proposals:
        artifacts += proposal_artifacts(ours, peer_model, images, input_name, work,
                                        ort_ok="ort" in args.peers and have("ml_dtypes"))
    for art in artifacts:
        log.info("%s: quantized in %s s", art.label,
                 "-" if art.quant_seconds is None else f"{art.quant_seconds:.1f}")

    probe = val_dataset(cfg, preprocess_for(cfg, OrtBackend(fp32.onnx_path, 1).input_shape),
                        max_images=1)
    converted = convert_for(cfg, probe) if "paddle" in runtimes else None
    fp32_paddle = (converted.model_file, converted.params_file) if converted else None
    image = probe.load(0).tensor[None]  # a real preprocessed val image, the same for all

    cands = candidates_for(artifacts, fp32_paddle, args.threads, runtimes, args.ort_spinning)
    reports = {}
    for art in artifacts:
        if art.onnx_path:
            reports[art.label] = ort_int8_report(art.onnx_path)
    for c in cands:
        try:
            c.backend = c.make()
        except Exception as exc:  # any runtime may refuse an artifact: record it, keep going
            c.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("%s on %s: cannot load: %s", c.artifact.label, c.runtime, c.error)
            continue
        if c.runtime == "onnxruntime":
            r = reports[c.artifact.label]
            c.ort_report = {k: r[k] for k in ("conv_total", "conv_int8", "quantize", "dequantize")}
            c.int8_convs = f"{r['conv_int8']}/{r['conv_total']}"
        elif c.runtime == "openvino":
            n8, total = c.backend.int8_convs()
            c.int8_convs = f"{n8}/{total}"
        elif "int8" in c.runtime:
            c.int8_convs = "oneDNN"  # Paddle does not expose its fused graph cheaply

    log.info("timing %d candidates: %d warm-up + %d interleaved rounds, %d threads",
             sum(c.backend is not None for c in cands), args.warmup, args.rounds, args.threads)
    time_interleaved(cands, image, args.rounds, args.warmup)

    if not args.no_eval:
        for c in cands:
            if c.backend is None:
                continue
            c.backend.name = c.runtime
            try:
                r = evaluate_backend(cfg, c.backend, args.max_images)
            except Exception as exc:  # a runtime may fail mid-run: the table says so
                c.error = f"eval: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.warning("%s on %s: %s", c.artifact.label, c.runtime, c.error)
                continue
            c.metrics = {"map50_95": r.map50_95, "map50": r.map50, "images": r.images}
            c.result = r
            log.info("%s on %s: mAP@0.5:0.95 %.4f", c.artifact.label, c.runtime, r.map50_95)

    rows = []
    timed = [c for c in cands if c.times]
    fp32_best = min((stats(c.times)["median_ms"] for c in timed if c.artifact.precision == "fp32"),
                    default=None)
    fp32_cpu_best = min((float(np.median(c.cpu_times)) for c in timed
                         if c.artifact.precision == "fp32"), default=None)
    fp32_ref = next((c.result for c in cands
                     if c.artifact.precision == "fp32" and c.runtime == "onnxruntime" and c.result),
                    None)
    weights = resample_weights(fp32_ref.images) if fp32_ref is not None else None
    for c in cands:
        row = {"artifact": c.artifact.label, "precision": c.artifact.precision,
               "runtime": c.runtime, "quant_seconds": c.artifact.quant_seconds,
               "int8_convs": c.int8_convs, "ort_report": c.ort_report, "metrics": c.metrics,
               "error": c.error}
        if c.times:
            row.update(stats(c.times, c.cpu_times))
            row["ratio_to_fastest_fp32"] = row["median_ms"] / fp32_best if fp32_best else None
            row["cpu_ratio_to_fastest_fp32"] = (row["cpu_median_ms"] / fp32_cpu_best
                                                if fp32_cpu_best else None)
        if c.result is not None and fp32_ref is not None:
            # vs FP32 on ONNX Runtime, with a paired bootstrap 95% interval over the images
            d = paired_delta(fp32_ref.matches, c.result.matches, weights=weights).map50_95
            row["map_delta_points"] = d.value * 100
            row["map_delta_ci95_points"] = [d.lo * 100, d.hi * 100]
        rows.append(row)
    fastest_fp32 = min((r for r in rows if r["precision"] == "fp32" and "median_ms" in r),
                       key=lambda r: r["median_ms"], default=None)
    return {
        "config": shown_path(config_path),
        "model": cfg.model_dir,
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "batch": 1,
        "ort_spinning": args.ort_spinning,
        "calibration": {"images": len(images), "image_ids": image_ids},
        "fastest_fp32": fastest_fp32 and {"runtime": fastest_fp32["runtime"],
                                          "median_ms": fastest_fp32["median_ms"]},
        "artifacts": [{"label": a.label, "onnx": str(a.onnx_path) if a.onnx_path else None,
                       "quant_seconds": a.quant_seconds, "notes": a.notes} for a in artifacts],
        "rows": rows,
        "machine": machine(),
        "load_average": os.getloadavg(),
        "versions": {**package_versions(), **versions_of(EXTRA_PACKAGES)},
        "env": {k: os.environ.get(k) for k in ("KMP_BLOCKTIME", "OMP_NUM_THREADS")},
        "artifacts_dir": str(work) if args.keep_artifacts else None,
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    fast = result["fastest_fp32"]
    lines = [
        f"# Speed: {Path(result['model']).name} ({result['config']})",
        "",
        f"{machine_line(m)}; batch 1, {result['threads']} threads; "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up "
        f"(load average at the end {', '.join(f'{v:.1f}' for v in result['load_average'])}). "
        f"mAP@0.5:0.95 on the val set (delta to FP32 on ONNX Runtime in points; {CI_NOTE}); "
        f"calibration: {result['calibration']['images']} train images (the same for every method).",
        "",
        "| artifact | runtime | median ms | p10-p90 ms | x fastest FP32 | CPU ms | CPU x fastest "
        "| mAP@0.5:0.95 (Δ pts [95% CI]) | quant s | int8 convs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "median_ms" in r:
            lat = f"{r['median_ms']:.1f}"
            spread = f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}"
            ratio = f"{r['ratio_to_fastest_fp32']:.2f}" if r.get("ratio_to_fastest_fp32") else "-"
            cpu = f"{r['cpu_median_ms']:.1f}"
            cpu_ratio = f"{r['cpu_ratio_to_fastest_fp32']:.2f}" if r.get("cpu_ratio_to_fastest_fp32") else "-"
        else:
            lat, spread, ratio, cpu, cpu_ratio = "failed", "-", "-", "-", "-"
        if r["metrics"]:
            acc = f"{r['metrics']['map50_95']:.4f}"
            if r.get("map_delta_points") is not None and not (
                    r["precision"] == "fp32" and r["runtime"] == "onnxruntime"):
                ci = r.get("map_delta_ci95_points")  # vs FP32 on ONNX Runtime
                acc += (f" ({r['map_delta_points']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}])" if ci
                        else f" ({r['map_delta_points']:+.2f})")
        else:
            acc = "-" if not r["error"] else "failed"
        qs = "-" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}"
        lines.append(f"| {r['artifact']} | {r['runtime']} | {lat} | {spread} | {ratio} | {cpu} "
                     f"| {cpu_ratio} | {acc} "
                     f"| {qs} | {r['int8_convs'] or '-'} |")
    errors = [r for r in result["rows"] if r["error"]]
    if errors:
        lines += [""] + [f"* {r['artifact']} on {r['runtime']}: {r['error']}" for r in errors]
    v = result["versions"]
    lines += ["", f"Fastest FP32: {fast['runtime']} {fast['median_ms']:.1f} ms." if fast else "",
              "Latency: wall time, median and p10-p90 of the interleaved runs; x fastest FP32: "
              "median / the fastest FP32 median. CPU ms: median process CPU time per run (all "
              "threads), which the other jobs on a shared machine barely change; CPU x fastest: "
              "the same ratio against the FP32 row with the least CPU time. "
              "ONNX Runtime sessions run without thread spinning unless --ort_spinning; "
              "OpenVINO runs float layers in f32 (no bf16).",
              "(proposal) rows: forms of our own artifact that yoloquant/qdq.py could write, "
              "built from it here (bench/experiments/README.md); each is timed on the runtime it "
              "is meant for.",
              "int8 convs: ONNX Runtime = QLinearConv after full graph optimisation / all convs; "
              "OpenVINO = convolutions executed in u8/i8 / all; Paddle = oneDNN int8 on conv ops "
              "(count not exposed). Quant s: wall time of the whole quantization (ours includes "
              "loading images, the cached ONNX->Paddle conversion and the ONNX scale export).",
              "", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    return "\n".join(lines) + "\n"


def prepare_demo_data(cfg: Config) -> None:
    """The demo config's data set is generated on first use (yoloquant.demo_data)."""
    try:
        from yoloquant import demo_data
    except ImportError:  # no demo support in this checkout: nothing to generate
        return
    if hasattr(demo_data, "maybe_generate_for"):
        demo_data.maybe_generate_for(cfg)
    elif hasattr(demo_data, "is_demo_dataset_dir") and demo_data.is_demo_dataset_dir(cfg.dataset_dir):
        demo_data.ensure_demo_data(cfg.dataset_dir)


def shown_path(path: str) -> str:
    """A config path relative to the repository when inside it (results are committed)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


def default_configs() -> list[str]:
    from yoloquant.assets import have_assets

    if have_assets():
        return [str(REPO / c) for c in DEFAULT_CONFIGS]
    demo = REPO / DEMO_CONFIG
    if demo.is_file():
        return [str(demo)]
    raise YoloQuantError("no config given, the real assets are absent (YOLOQUANT_ASSETS) and "
                         f"{DEMO_CONFIG} does not exist")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", nargs="+", default=None,
                        help="model+data configs (default: yolov5n and yolox_nano when the "
                             "assets exist, else configs/demo.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved timed rounds")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--runtimes", nargs="+", default=["paddle", "onnxruntime", "openvino"],
                        choices=["paddle", "onnxruntime", "openvino"])
    parser.add_argument("--peers", nargs="*", default=["ort", "nncf"], choices=["ort", "nncf"])
    parser.add_argument("--max_images", type=int, default=None,
                        help="evaluate on the first N val images only (default: all)")
    parser.add_argument("--no_eval", action="store_true", help="latency only, no mAP")
    parser.add_argument("--ort_spinning", action="store_true",
                        help="let ONNX Runtime's idle threads spin (its default); off here because "
                             "on a shared CPU spinning threads slow the other candidates (and ORT)")
    parser.add_argument("--no_proposals", action="store_true",
                        help="skip the rows of the proposed QDQ forms (bench/experiments)")
    parser.add_argument("--keep_artifacts", action="store_true",
                        help="keep the quantized models (their folder is named in the JSON)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    # onnxruntime.quantization raises the root logger to WARNING on import: keep our progress lines
    logging.getLogger("yoloquant").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        configs = args.config_path or default_configs()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for config_path in configs:
            result = bench_config(config_path, args)
            name = Path(config_path).stem
            table = markdown(result)
            (out / f"speed_{name}.md").write_text(table)
            write_json(out / f"speed_{name}.json", result)
            print(table, flush=True)
    except YoloQuantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
