"""Benchmark: every PTQ algorithm on one model, mAP of both deployed INT8 artifacts + PTQ time.

  python bench/ptq_algorithms.py --config_path configs/yolov5n_coco_mini.yaml --out bench/results

Prints a Markdown table and writes it with a JSON copy to --out. Timings are wall time on this
machine (note its load); compare rows of one run, not runs of different days. Unless
--no-heldout, every model is also scored on the train split's annotated images that calibration
did not use (a second evaluation set: on 109 val images alone, differences of half a point
between variants were noise).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.calibration import WEIGHT_QUANTIZE_TYPES  # noqa: E402
from yoloquant.config import PTQ_ALGOS, WEIGHT_ROUNDINGS, load_config  # noqa: E402
from yoloquant.evaluate import evaluate_backend, evaluate_saved, heldout_config  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402
from yoloquant.ptq import quantize  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend  # noqa: E402
from yoloquant.stats import CI_NOTE  # noqa: E402
from yoloquant.validator import compare_to  # noqa: E402

# every int8 runtime evaluate_saved scores a saved model on (OpenVINO too since it is a requirement)
RUNTIMES = {"paddle-inference(onednn-int8)": "paddle_int8", "onnxruntime": "onnx_int8",
            "openvino": "openvino_int8"}


def scored(cfg, save_dir, reference, prefix: str = "") -> dict:
    """{paddle_int8, onnx_int8} of a saved run: mAP and the paired delta to `reference`."""
    results = evaluate_saved(cfg, save_dir)
    compare_to(reference, results)
    return {prefix + RUNTIMES[r.runtime]: {"map50_95": r.map50_95, **r.delta.as_dict()}
            for r in results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/yolov5n_coco_mini.yaml")
    parser.add_argument("--algos", nargs="+", default=list(PTQ_ALGOS), choices=PTQ_ALGOS)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--heldout", action=argparse.BooleanOptionalAction, default=True,
                        help="also evaluate on the train images calibration did not use")
    parser.add_argument("--weight_rounding", choices=WEIGHT_ROUNDINGS, default=None,
                        help="override the config's weight_rounding")
    parser.add_argument("--weight_quantize_type", choices=WEIGHT_QUANTIZE_TYPES, default=None,
                        help="override the config's PTQ.weight_quantize_type")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config_path)
    variant = ""
    if args.weight_rounding:
        cfg.weight_rounding = args.weight_rounding
        variant += f"_{args.weight_rounding}"
    if args.weight_quantize_type:
        cfg.PTQ.weight_quantize_type = args.weight_quantize_type
        variant += f"_{args.weight_quantize_type}"
    fp32 = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir))
    rows, heldout_fp32, work = [], None, tempfile.TemporaryDirectory()
    for algo in args.algos:
        cfg.PTQ.algo = algo
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = quantize(cfg, tmp)
            total = time.perf_counter() - start
            metrics = scored(cfg, tmp, fp32)
            if args.heldout:
                held = heldout_config(cfg, result.summary["calibration"]["image_ids"], work.name)
                if heldout_fp32 is None:
                    heldout_fp32 = evaluate_backend(held, OnnxRuntimeBackend(cfg.model_dir))
                metrics.update(scored(held, tmp, heldout_fp32, prefix="heldout_"))
        rows.append({"algo": algo, **metrics, "ptq_seconds": result.summary["seconds"]["ptq"],
                     "job_seconds": round(total, 1), "calibration_images": result.summary["calibration"]["images"],
                     "int8_convs": len(result.summary["quantized"]["onnx_conv_nodes"]),
                     "float_convs": len(result.summary["kept_float"]["conv_reasons"])})
        print(rows[-1], flush=True)

    def cell(m: dict) -> str:
        lo, hi = m["delta_ci95"]
        return f"{m['map50_95']:.4f} ({100 * m['delta']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}])"

    lines = [f"FP32 (ONNX Runtime): mAP@0.5:0.95 {fp32.map50_95:.4f} on {fp32.images} val images"
             + (f", {heldout_fp32.map50_95:.4f} on {heldout_fp32.images} held-out train images"
                if heldout_fp32 else "")
             + f"; calibration: {rows[0]['calibration_images']} images; weights: "
             f"{cfg.PTQ.weight_quantize_type}, rounding: {cfg.weight_rounding}. Cells: mAP@0.5:0.95 "
             f"(delta to FP32 in points [{CI_NOTE}])", machine_line(), ""]
    ov = "openvino_int8" in rows[0]
    held_head = (" held-out Paddle | held-out ONNX |" + (" held-out OpenVINO |" if ov else "")
                 if heldout_fp32 else "")
    lines += ["| algo | Paddle oneDNN int8 | QDQ ONNX (ORT) |" + (" QDQ ONNX (OpenVINO) |" if ov else "")
              + held_head + " int8 / float convs | PTQ s | whole job s |",
              "|---|---|---|" + ("---|" if ov else "") + (("---|---|" + ("---|" if ov else ""))
                                                             if heldout_fp32 else "") + "---|---|---|"]
    for r in rows:
        held_cells = (f" {cell(r['heldout_paddle_int8'])} | {cell(r['heldout_onnx_int8'])} |"
                      + (f" {cell(r['heldout_openvino_int8'])} |" if ov else "") if heldout_fp32 else "")
        ov_cell = f" {cell(r['openvino_int8'])} |" if ov else ""
        lines.append(f"| {r['algo']} | {cell(r['paddle_int8'])} | {cell(r['onnx_int8'])} |{ov_cell}{held_cells}"
                     f" {r['int8_convs']} / {r['float_convs']} "
                     f"| {r['ptq_seconds']:.1f} | {r['job_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config_path).stem + variant
    (out / f"ptq_algorithms_{name}.md").write_text(table + "\n")
    work.cleanup()
    write_json(out / f"ptq_algorithms_{name}.json", {"fp32": fp32.as_dict(), "rows": rows,
                                                      "heldout_fp32": heldout_fp32.as_dict() if heldout_fp32 else None,
                                                      "versions": package_versions(), "machine": machine()})


if __name__ == "__main__":
    main()
