"""Benchmark: cross-layer equalization (config `equalization`) before vs after, per model.

  python bench/equalization.py --config_path configs/yolov6lite_m_320_ptq.yaml --modes none cle cle_gate

For each mode runs the whole post_quant job (same calibration images), then scores FP32 and
every INT8 artifact (Paddle int8, QDQ ONNX on ONNX Runtime and on OpenVINO) on the val set and
on the held-out train images calibration did not use (yoloquant.evaluate.heldout_config), each
INT8 delta with its paired-bootstrap 95% interval (yoloquant.stats). Reports convs kept float and
how many pairs were equalized, and (--latency_rounds) the process CPU ms per image of FP32 and
each mode's QDQ ONNX on ONNX Runtime and OpenVINO, interleaved round-robin (bench/speed.py's
timing), 2 threads, no spinning: CPU time, because the machine is shared. Writes Markdown (first
line: the machine) and JSON to --out.
"""
import argparse
import numpy as np
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import EQUALIZATIONS, load_config  # noqa: E402
from yoloquant.evaluate import evaluate_backend, evaluate_saved, heldout_config  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402
from yoloquant.ptq import quantize  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend  # noqa: E402
from yoloquant.stats import CI_NOTE  # noqa: E402
from yoloquant.validator import compare_to  # noqa: E402

LABELS = {"paddle-inference(onednn-int8)": "Paddle int8", "onnxruntime": "ONNX ORT",
          "openvino": "ONNX OpenVINO"}


def score(cfg, save_dir: str) -> dict:
    """{runtime label: (mAP, delta points, (low, high))} of every artifact against FP32."""
    fp32 = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir))
    rows = evaluate_saved(cfg, save_dir)
    compare_to(fp32, rows)
    out = {"FP32": {"map50_95": fp32.map50_95, "images": fp32.images}}
    for r in rows:
        d = r.delta.map50_95
        out[LABELS.get(r.runtime, r.runtime)] = {"map50_95": r.map50_95, "delta_points": 100 * d.value,
                                                 "ci95_points": [100 * d.lo, 100 * d.hi]}
    return out


def run_mode(cfg, mode: str, work: Path) -> dict:
    cfg = dataclasses.replace(cfg, equalization=mode)
    started = time.process_time()
    result = quantize(cfg, work / mode)
    cpu_s = time.process_time() - started
    s = result.summary
    eq = s.get("equalization") or {}
    convs = len(s["quantized"]["onnx_conv_nodes"]) + len(s["kept_float"]["conv_nodes"])
    held = heldout_config(cfg, s["calibration"]["image_ids"], work / mode)
    return {"mode": mode, "convs": convs, "float_convs": len(s["kept_float"]["conv_nodes"]),
            "pairs_found": eq.get("pairs_found", 0), "pairs_equalized": eq.get("pairs_equalized", 0),
            "equalization_message": eq.get("message", ""), "ptq_job_cpu_s": round(cpu_s, 1),
            "val": score(cfg, str(work / mode)), "heldout": score(held, str(work / mode))}


def latency(cfg, work: Path, modes: list, rounds: int, threads: int = 2) -> dict:
    """{runtime: {FP32 / mode: CPU ms median}} (bench/speed.py's interleaved timing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/speed.py imports its siblings
    from speed import Artifact, Candidate, OpenVinoBackend, OrtBackend, stats, time_interleaved
    from yoloquant.evaluate import have_openvino

    files = {"FP32": Path(cfg.model_dir)} | {m: work / m / "model_int8.onnx" for m in modes}
    cands = []
    for runtime in ["onnxruntime"] + (["openvino"] if have_openvino() else []):
        for label, path in files.items():
            make = (lambda p=path: OrtBackend(p, threads, spinning=False)) if runtime == "onnxruntime" \
                else (lambda p=path: OpenVinoBackend(p, threads))
            cands.append(Candidate(Artifact(label, "onnx", path), runtime, make))
    for c in cands:
        c.backend = c.make()
    shape = [d if isinstance(d, int) else 1 for d in cands[0].backend.input_shape]
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    time_interleaved(cands, image, rounds, warmup=3)
    out: dict = {}
    for c in cands:
        out.setdefault(c.runtime, {})[c.artifact.label] = round(stats(c.times, c.cpu_times)["cpu_median_ms"], 2)
    return out


def fmt(cell: dict) -> str:
    if "delta_points" not in cell:
        return f"{cell['map50_95']:.4f}"
    lo, hi = cell["ci95_points"]
    return f"{cell['map50_95']:.4f} ({cell['delta_points']:+.2f} [{lo:+.2f}, {hi:+.2f}])"


def latency_lines(lat: dict) -> list:
    if not lat:
        return []
    lines = ["", "Process CPU ms per image (median, 2 threads, interleaved; ratio to FP32 on the same runtime):", "",
             "| runtime | " + " | ".join(lat[next(iter(lat))]) + " |", "|---|" + "---|" * len(lat[next(iter(lat))])]
    for runtime, cells in lat.items():
        lines.append(f"| {runtime} | " + " | ".join(f"{v:.1f} ({v / cells['FP32']:.2f}x)" for v in cells.values()) + " |")
    return lines


def markdown(config: str, rows: list, info: dict, lat: dict = None) -> str:
    runtimes = [k for k in rows[0]["val"] if k != "FP32"]
    lines = [machine_line(info), "", f"# Equalization before/after: `{Path(config).name}`", "",
             f"FP32 mAP@0.5:0.95: val {rows[0]['val']['FP32']['map50_95']:.4f} "
             f"({rows[0]['val']['FP32']['images']} images), held-out {rows[0]['heldout']['FP32']['map50_95']:.4f} "
             f"({rows[0]['heldout']['FP32']['images']} images). INT8 cells: mAP (delta points vs FP32 "
             "[95% CI]).", "",
             "| equalization | convs float | pairs equalized | set | " + " | ".join(runtimes) + " |",
             "|---|---|---|---|" + "---|" * len(runtimes)]
    for r in rows:
        for split in ("val", "heldout"):
            lines.append(f"| {r['mode']} | {r['float_convs']} / {r['convs']} | "
                         f"{r['pairs_equalized']} / {r['pairs_found']} | {split} | "
                         + " | ".join(fmt(r[split][k]) for k in runtimes) + " |")
    lines += ["", CI_NOTE, ""] + [f"- {r['mode']}: {r['equalization_message']} (job CPU {r['ptq_job_cpu_s']} s)"
                                  for r in rows if r["equalization_message"]]
    return "\n".join(lines + latency_lines(lat or {})) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", default="configs/yolov6lite_m_320_ptq.yaml")
    parser.add_argument("--modes", nargs="+", default=["none", "cle_gate"], choices=EQUALIZATIONS)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--latency_rounds", type=int, default=30, help="0: no latency")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config_path)
    lat = {}
    with tempfile.TemporaryDirectory(prefix="eq-bench-") as tmp:
        rows = [run_mode(cfg, mode, Path(tmp)) for mode in args.modes]
        if args.latency_rounds > 0:
            lat = latency(cfg, Path(tmp), args.modes, args.latency_rounds)
    info = machine()
    stem = f"equalization_{Path(args.config_path).stem}"
    text = markdown(args.config_path, rows, info, lat)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{stem}.md").write_text(text)
    write_json(Path(args.out) / f"{stem}.json", {"config": args.config_path, "rows": rows, "latency_cpu_ms": lat,
                                                  "machine": info,
                                                  "versions": package_versions()})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
