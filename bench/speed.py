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
* our QDQ ONNX in each layout of yoloquant/qdq (deploy_backend onnxruntime / openvino /
  tensorrt, from one calibration), and the onnxruntime layout with the other gate forms (SiLU
  float between DQ and Q, HardSwish in int8), to pick by measurement;

then times FP32 and each artifact on Paddle Inference (oneDNN fp32 / int8), ONNX Runtime and
OpenVINO (when installed: it reads QDQ ONNX), batch 1, fixed threads. Runs are interleaved
round-robin across all candidates, in a shuffled order each round, so machine noise hits all
alike; the table gives the median, p10 and p90, the ratio to the fastest FP32 runtime, mAP@0.5:0.95
of each artifact on that runtime (val set, all images), the quantization wall time and the int8
conv count (ONNX Runtime: fused QLinearConv after graph optimisation; OpenVINO: convolutions
executed in u8/i8).

For every candidate on ONNX Runtime / OpenVINO it also records int8 vs float kernel counts and
a per-op-type time profile (bench/profiles.py), and mAP on the held-out train images too.

  python bench/speed.py          # the whole table: yolov5n, YOLOX-nano, YOLOv6-Lite-M 320

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

from artifacts import (Artifact, calibration_images, head_nodes, our_activation_scales,  # noqa: E402,F401
                       peer_input_model, quantize_nncf, quantize_nncf_openvino, quantize_ort,
                       quantize_ours)
from profiles import ort_kernels, ort_profile, ov_kernels, ov_profile, profile_line  # noqa: E402
from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import Config, load_config  # noqa: E402
from yoloquant.errors import YoloQuantError  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions, versions_of  # noqa: E402
from yoloquant.stats import CI_NOTE, paired_delta, resample_weights  # noqa: E402

log = logging.getLogger("yoloquant.bench")

DEFAULT_CONFIGS = ("configs/yolov5n_coco_mini.yaml", "configs/yolox_nano_coco_mini.yaml",
                   "configs/yolov6lite_m_320_ptq.yaml")
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


def OpenVinoBackend(path: Path, threads: int):  # noqa: N802 - the package's backend
    from yoloquant.runtime import OpenVinoBackend as Backend

    return Backend(path, threads)


def paddle_backend(model_file: Path, params_file: Path, threads: int, int8: bool):
    from yoloquant.runtime import PaddleInferenceBackend, PaddleModelFiles

    return PaddleInferenceBackend(PaddleModelFiles(Path(model_file), Path(params_file)),
                                  int8=int8, threads=threads)


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
    kernels: Optional[dict] = None  # int8 / float kernel counts (bench/profiles.py)
    profile: Optional[dict] = None  # op type -> ms per run
    metrics: Optional[dict] = None
    heldout: Optional[dict] = None
    error: Optional[str] = None
    result: object = None  # validator.EvalResult (its per-image matches give the intervals)
    heldout_result: object = None


def candidates_for(artifacts: list[Artifact], fp32_paddle: Optional[tuple], threads: int,
                   runtimes: list[str], spinning: bool) -> list[Candidate]:
    cands = []
    for art in artifacts:
        only = art.notes.get("runtimes")
        if only:  # a layout is timed on the runtimes it is meant for
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


def ort_report_with_kernels(path: Path) -> dict:
    """yoloquant.qdq.ort_int8_report plus int8 / float kernel counts of the optimised graph."""
    from yoloquant.qdq import ort_int8_report
    from yoloquant.qdq.check import _session

    report = ort_int8_report(path)
    with tempfile.TemporaryDirectory(prefix="ortopt_") as tmp:
        _session(path, optimized_path=str(Path(tmp) / "opt.onnx"))
        report["kernels"] = ort_kernels(onnx.load(str(Path(tmp) / "opt.onnx")))
    return report


def profile_candidates(cands: list[Candidate], image: np.ndarray, threads: int) -> None:
    """Per-op-type time of every ORT / OpenVINO candidate, one after the other (after the timed
    rounds: the profilers' own overhead stays out of the latencies)."""
    for c in cands:
        if c.backend is None or c.runtime not in ("onnxruntime", "openvino"):
            continue
        path = c.artifact.onnx_path if c.runtime == "onnxruntime" else (c.artifact.ov_ir or c.artifact.onnx_path)
        try:
            c.profile = (ort_profile if c.runtime == "onnxruntime" else ov_profile)(path, threads, image)
        except Exception as exc:  # a profiler failing must not lose the table
            log.warning("%s on %s: no profile: %s", c.artifact.label, c.runtime, exc)


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
    # every layout is built below from one calibration, judged (float fallback, equalization)
    # for the config's deploy_backend: the layout post_quant.py would write is the faithful row
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
    from yoloquant.evaluate import convert_for
    from yoloquant.validator import preprocess_for, val_dataset

    images, image_ids, input_name = calibration_images(cfg, cfg.model_dir)
    artifacts = build_artifacts(cfg, images, image_ids, input_name, runtimes, work, args.peers)
    probe = val_dataset(cfg, preprocess_for(cfg, OrtBackend(artifacts[0].onnx_path, 1).input_shape),
                        max_images=1)
    converted = convert_for(cfg, probe) if "paddle" in runtimes else None
    fp32_paddle = (converted.model_file, converted.params_file) if converted else None
    image = probe.load(0).tensor[None]  # a real preprocessed val image, the same for all

    cands = candidates_for(artifacts, fp32_paddle, args.threads, runtimes, args.ort_spinning)
    load_candidates(cands, artifacts)
    log.info("timing %d candidates: %d warm-up + %d interleaved rounds, %d threads",
             sum(c.backend is not None for c in cands), args.warmup, args.rounds, args.threads)
    time_interleaved(cands, image, args.rounds, args.warmup)
    if not args.no_profile:
        profile_candidates(cands, image, args.threads)
    if not args.no_eval:
        evaluate_candidates(cands, cfg, image_ids, work, args.max_images, not args.no_heldout)
    return {
        "config": shown_path(config_path),
        "model": cfg.model_dir,
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "batch": 1,
        "ort_spinning": args.ort_spinning,
        "calibration": {"images": len(images), "image_ids": image_ids},
        "heldout_images": next((c.heldout["images"] for c in cands if c.heldout), None),
        **table_rows(cands),
        "artifacts": [{"label": a.label, "onnx": str(a.onnx_path) if a.onnx_path else None,
                       "quant_seconds": a.quant_seconds, "notes": a.notes} for a in artifacts],
        "machine": machine(),
        "load_average": os.getloadavg(),
        "versions": {**package_versions(), **versions_of(EXTRA_PACKAGES)},
        "env": {k: os.environ.get(k) for k in ("KMP_BLOCKTIME", "OMP_NUM_THREADS")},
        "artifacts_dir": str(work) if args.keep_artifacts else None,
    }


def build_artifacts(cfg: Config, images, image_ids, input_name: str, runtimes: list[str], work: Path,
                    peers) -> list[Artifact]:
    """FP32, ours (every layout) and the peers, all from the same calibration images."""
    artifacts = [Artifact("FP32", "fp32", onnx_path=Path(cfg.model_dir))]
    ours = quantize_ours(cfg, work / "yoloquant")
    if [str(i) for i in ours[0].notes["calibration_image_ids"]] != [str(i) for i in image_ids]:
        raise YoloQuantError("the peers' calibration images differ from our flow's")
    artifacts += ours
    peer_model = peer_input_model(cfg.model_dir, images[0][None], input_name, work)
    if "ort" in peers and not have("ml_dtypes"):
        # onnxruntime.quantization imports ml_dtypes, which onnxruntime does not declare
        log.warning("onnxruntime.quantization needs ml_dtypes (pip install -r "
                    "bench/requirements-peers.txt): the ORT quantize_static row is skipped")
    elif "ort" in peers:
        artifacts.append(quantize_ort(peer_model, images, input_name, work / "ort_qdq.onnx"))
    if "nncf" in peers:
        if have("nncf"):
            artifacts.append(quantize_nncf(peer_model, images, input_name, work / "nncf_qdq.onnx"))
            if "openvino" in runtimes:
                artifacts.append(quantize_nncf_openvino(peer_model, images, work / "nncf_ov.xml"))
        else:
            log.warning("nncf is not installed: its rows are skipped "
                        "(pip install -r bench/requirements-peers.txt)")
    for art in artifacts:
        log.info("%s: quantized in %s s", art.label,
                 "-" if art.quant_seconds is None else f"{art.quant_seconds:.1f}")
    return artifacts


def load_candidates(cands: list[Candidate], artifacts: list[Artifact]) -> None:
    """Build every backend (a runtime refusing an artifact is recorded, not fatal) and read what
    it runs in int8."""
    reports = {art.label: ort_report_with_kernels(art.onnx_path) for art in artifacts if art.onnx_path}
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
            c.kernels = r["kernels"]
        elif c.runtime == "openvino":
            n8, total = c.backend.int8_convs()
            c.int8_convs = f"{n8}/{total}"
            c.kernels = ov_kernels(c.backend.layer_info())
        elif "int8" in c.runtime:
            c.int8_convs = "oneDNN"  # Paddle does not expose its fused graph cheaply


def evaluate_candidates(cands: list[Candidate], cfg: Config, image_ids, work: Path,
                        max_images: Optional[int], heldout: bool) -> None:
    """mAP of every candidate on the val set and (``heldout``) on the train images calibration
    did not use."""
    from yoloquant.evaluate import evaluate_backend, heldout_config

    heldout_cfg = heldout_config(cfg, image_ids, work) if heldout else None
    for c in cands:
        if c.backend is None:
            continue
        c.backend.name = c.runtime
        try:
            r = evaluate_backend(cfg, c.backend, max_images)
            h = evaluate_backend(heldout_cfg, c.backend, max_images) if heldout_cfg else None
        except Exception as exc:  # a runtime may fail mid-run: the table says so
            c.error = f"eval: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("%s on %s: %s", c.artifact.label, c.runtime, c.error)
            continue
        c.metrics = {"map50_95": r.map50_95, "map50": r.map50, "images": r.images}
        c.result, c.heldout_result = r, h
        if h is not None:
            c.heldout = {"map50_95": h.map50_95, "map50": h.map50, "images": h.images}
        log.info("%s on %s: mAP@0.5:0.95 %.4f (held-out %s)", c.artifact.label, c.runtime,
                 r.map50_95, f"{h.map50_95:.4f}" if h else "-")


def table_rows(cands: list[Candidate]) -> dict:
    """{"rows": [...], "fastest_fp32": ...}: latency stats, ratios to the fastest FP32 and mAP
    differences to FP32 on ONNX Runtime."""
    timed = [c for c in cands if c.times]
    fp32_best = min((stats(c.times)["median_ms"] for c in timed if c.artifact.precision == "fp32"),
                    default=None)
    fp32_cpu_best = min((float(np.median(c.cpu_times)) for c in timed
                         if c.artifact.precision == "fp32"), default=None)
    ref = next((c for c in cands if c.artifact.precision == "fp32" and c.runtime == "onnxruntime"), None)
    rows = []
    for c in cands:
        row = {"artifact": c.artifact.label, "precision": c.artifact.precision,
               "runtime": c.runtime, "quant_seconds": c.artifact.quant_seconds,
               "int8_convs": c.int8_convs, "ort_report": c.ort_report, "metrics": c.metrics,
               "heldout": c.heldout, "kernels": c.kernels, "profile_ms": c.profile,
               "error": c.error}
        if c.times:
            row.update(stats(c.times, c.cpu_times))
            row["ratio_to_fastest_fp32"] = row["median_ms"] / fp32_best if fp32_best else None
            row["cpu_ratio_to_fastest_fp32"] = (row["cpu_median_ms"] / fp32_cpu_best
                                                if fp32_cpu_best else None)
        if ref is not None:
            # vs FP32 on ONNX Runtime, with a paired bootstrap 95% interval over the images
            for key, mine, base in (("map", c.result, ref.result),
                                    ("heldout", c.heldout_result, ref.heldout_result)):
                if mine is not None and base is not None:
                    d = paired_delta(base.matches, mine.matches,
                                     weights=resample_weights(base.images)).map50_95
                    row[f"{key}_delta_points"] = d.value * 100
                    row[f"{key}_delta_ci95_points"] = [d.lo * 100, d.hi * 100]
        rows.append(row)
    fastest = min((r for r in rows if r["precision"] == "fp32" and "median_ms" in r),
                  key=lambda r: r["median_ms"], default=None)
    return {"rows": rows, "fastest_fp32": fastest and {"runtime": fastest["runtime"],
                                                       "median_ms": fastest["median_ms"]}}


def _map_cell(metrics: Optional[dict], delta: Optional[float], ci: Optional[list],
              reference: bool) -> str:
    if not metrics:
        return "-"
    cell = f"{metrics['map50_95']:.4f}"
    if reference or delta is None:
        return cell
    return cell + (f" ({delta:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}])" if ci else f" ({delta:+.2f})")


def markdown(result: dict) -> str:
    m = result["machine"]
    fast = result["fastest_fp32"]
    held = result.get("heldout_images")
    lines = [
        f"# Speed: {Path(result['model']).name} ({result['config']})",
        "",
        f"{machine_line(m)}; batch 1, {result['threads']} threads; "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up "
        f"(load average at the end {', '.join(f'{v:.1f}' for v in result['load_average'])}). "
        f"mAP@0.5:0.95 on the val set{f' and on the {held} held-out train images' if held else ''} "
        f"(delta to FP32 on ONNX Runtime in points; {CI_NOTE}); "
        f"calibration: {result['calibration']['images']} train images (the same for every method).",
        "",
        "| artifact | runtime | median ms | p10-p90 ms | x fastest FP32 | CPU ms | CPU x fastest "
        "| mAP val (Δ pts [95% CI]) | mAP held-out (Δ pts [95% CI]) | quant s | int8 convs "
        "| kernels int8 / float |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        reference = r["precision"] == "fp32" and r["runtime"] == "onnxruntime"
        acc = _map_cell(r["metrics"], r.get("map_delta_points"), r.get("map_delta_ci95_points"),
                        reference)
        if acc == "-" and r["error"]:
            acc = "failed"
        hacc = _map_cell(r.get("heldout"), r.get("heldout_delta_points"),
                         r.get("heldout_delta_ci95_points"), reference)
        k = r.get("kernels")
        kern = f"{k['int8']} / {k['float']}" if k else "-"
        qs = "-" if r["quant_seconds"] is None else f"{r['quant_seconds']:.0f}"
        lines.append(f"| {r['artifact']} | {r['runtime']} | {lat} | {spread} | {ratio} | {cpu} "
                     f"| {cpu_ratio} | {acc} | {hacc} | {qs} | {r['int8_convs'] or '-'} | {kern} |")
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
              "int8 convs: ONNX Runtime = QLinearConv after full graph optimisation / all convs; "
              "OpenVINO = convolutions executed in u8/i8 / all; Paddle = oneDNN int8 on conv ops "
              "(count not exposed). Kernels: ONNX Runtime = compute nodes of the optimised graph on "
              "int8 codes / on float values (Q/DQ and layout nodes not counted); OpenVINO = layers "
              "executed in u8/i8 / in f32. Quant s: wall time of the whole quantization (ours: "
              "loading images, the cached ONNX->Paddle conversion, PTQ, the SNR check, the glue "
              "ranges and writing that layout).",
              "", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    profiled = [r for r in result["rows"] if r.get("profile_ms")]
    if profiled:
        lines += ["", "## Time per op type (ms per run; ONNX Runtime profiler, OpenVINO PERF_COUNT)", ""]
        lines += [f"* {r['artifact']} on {r['runtime']}: {profile_line(r['profile_ms'])}" for r in profiled]
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
    parser.add_argument("--no_heldout", action="store_true",
                        help="val set only (default: also the train images calibration did not use)")
    parser.add_argument("--no_profile", action="store_true", help="no per-op-type profiles")
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
