"""Every QDQ layout of yoloquant/qdq from one calibration, side by side: what ORT / OpenVINO
run in int8, interleaved latency (wall and process CPU), optionally mAP.

  python bench/experiments/placements.py CONFIG OUT_DIR [--eval] [--rounds N] [--forms ...]

Forms: conv_only (the earlier artifact), onnxruntime (gate qlinear), ort_gate_float (the same
with SiLU / HardSwish float between DQ and Q), openvino, tensorrt; each written to OUT_DIR.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KMP_BLOCKTIME", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from yoloquant.qdq.rules import GLUE  # noqa: E402

from speed import (Candidate, OpenVinoBackend, OrtBackend, have, stats,  # noqa: E402
                   time_interleaved)
from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import load_config  # noqa: E402

FORMS = ("conv_only", "onnxruntime", "ort_gate_float", "openvino", "tensorrt")
VARIANTS = {  # name: (backend, rule overrides)
    "ort_gate_float": ("onnxruntime", {"gate": "float"}),
    "ov_int8": ("openvino", {"activation_type": "int8"}),
    "ov_int8_nobias": ("openvino", {"activation_type": "int8", "quantize_bias": False}),
    "ov_int8_inexact": ("openvino", {"activation_type": "int8", "exact_input": False}),
    "ov_u8_nobias": ("openvino", {"quantize_bias": False}),
    "ort_int8_image_conv": ("onnxruntime", {"int8_image_conv": True}),
    "ort_int8_head": ("onnxruntime", {"int8_head_convs": True}),
    "ort_sym": ("onnxruntime", {"asymmetric_inputs": False}),
    "ov_sym": ("openvino", {"asymmetric_inputs": False}),
    "ort_int8_image_conv_head": ("onnxruntime", {"int8_image_conv": True, "int8_head_convs": True}),
    "ort_float_head": ("onnxruntime", {"int8_head_outputs": False}),
    "ort_no_add": ("onnxruntime", {"ops": GLUE - {"add"}}),
    "ort_no_concat": ("onnxruntime", {"ops": GLUE - {"concat"}}),
    "ort_no_pool_resize": ("onnxruntime", {"ops": GLUE - {"maxpool", "resize"}}),
    "ort_pool_protected": ("onnxruntime", {"pool_reads_rounded": False}),
    "ort_hswish_qlinear": ("onnxruntime", {"hardswish_gate": "qlinear"}),
}


def build(cal, form):
    from yoloquant.deploy_onnx import build_qdq, exact_input_grids
    from yoloquant.qdq import place_qdq, rules_for, tensor_ranges

    skipped = set()
    if form in VARIANTS:
        backend, over = VARIANTS[form]
        if not cal.tensor_ranges:
            cal.tensor_ranges.update(tensor_ranges(cal.onnx_model, cal.images, cal.converted.onnx_input_name))
        rules = rules_for(backend, **over)
        model, report = place_qdq(cal.onnx_model, cal.conv_params, cal.tensor_ranges, rules=rules,
                                  input_grids=exact_input_grids(cal) if rules.exact_input else None)
        return model, report.as_dict()
    model = build_qdq(cal, skipped, backend=form)
    return model, cal.placement


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--forms", nargs="+", default=list(FORMS))
    ap.add_argument("--runtimes", nargs="+", default=["ort", "ov"])
    ap.add_argument("--sets", nargs="+", default=["val", "heldout"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                    help="config overrides, e.g. min_layer_snr_db=null")
    args = ap.parse_args()
    setup_logging()
    from yoloquant.ptq import calibrate
    from yoloquant.qdq import ort_int8_report

    import yaml
    cfg = load_config(args.config, {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.set)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cal = calibrate(cfg, out / "work")
    print("float convs:", cal.float_reasons)
    paths = {"fp32": Path(cfg.model_dir)}
    for form in args.forms:
        model, rep = build(cal, form)
        paths[form] = out / f"{form}.onnx"
        onnx.save(model, str(paths[form]))
        r = ort_int8_report(paths[form])
        print(f"{form}: placement {rep}; ORT int8 convs {r['conv_int8']}/{r['conv_total']}, "
              f"Q {r['quantize']} DQ {r['dequantize']}")
        print("   ", {k: v for k, v in r["op_counts"].items()})
    cands = []
    for form, p in paths.items():
        if "ort" in args.runtimes:
            cands.append(Candidate(None, f"{form}/ort", None))
            cands[-1].backend = OrtBackend(p, args.threads, spinning=False)
        if have("openvino") and "ov" in args.runtimes:
            cands.append(Candidate(None, f"{form}/ov", None))
            cands[-1].backend = OpenVinoBackend(p, args.threads)
    image = cal.images[0][None]
    time_interleaved(cands, image, args.rounds, 5)
    base = min(stats(c.times, c.cpu_times)["median_ms"] for c in cands if c.runtime.startswith("fp32"))
    for c in cands:
        s = stats(c.times, c.cpu_times)
        print(f"{c.runtime:28s} {s['median_ms']:7.1f} ms  x{s['median_ms'] / base:5.2f}  cpu {s['cpu_median_ms']:7.1f}")
    if args.eval:
        from yoloquant.evaluate import evaluate_backend, heldout_config
        cfgs = ([("val", cfg)] if "val" in args.sets else []) + (
            [("heldout", heldout_config(cfg, cal.image_ids, out))] if args.heldout else [])
        for name, c_ in cfgs:
            for c in cands:
                c.backend.name = c.runtime
                r = evaluate_backend(c_, c.backend)
                print(f"mAP {name} {c.runtime:28s} {r.map50_95:.4f}", flush=True)


if __name__ == "__main__":
    main()
