"""Benchmark: how far the int8 results move when the CPU takes another code path.

  python bench/cpu_paths.py --config_path configs/yolov5n_coco_mini.yaml --algos avg KL emd abs_max

The machines of this kind are not always the same CPU (Intel Xeon with or without AMX, AMD EPYC
with AVX512-VNNI), and the int8 kernels differ between them. Two libraries can be told to take a
narrower path on the machine at hand:

* oneDNN (Paddle Inference's int8 convs, Paddle's float kernels): ``ONEDNN_MAX_CPU_ISA``
  (AVX512_CORE_AMX on a Xeon with AMX, AVX512_CORE_VNNI as on an EPYC or an older Xeon, AVX2);
* Intel MKL (Paddle's float matrix products during calibration): ``MKL_ENABLE_INSTRUCTIONS``.

ONNX Runtime's MLAS has no such switch (it dispatches on CPUID alone), so on one machine its int8
path is fixed; its results still move with the calibration the other libraries compute.

Each path runs the whole post_quant job (calibration included) in a child process with the caps
set, and scores both INT8 artifacts on the evaluation set. Prints a Markdown table and writes it,
with a JSON copy, to --out. Used to set the bounds of the accuracy tests (tests/test_ptq.py).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.config import PTQ_ALGOS  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402

# name -> environment caps; "native" is whatever this CPU offers. MKL takes its generic AVX2
# code on AMD CPUs whatever they support, so "epyc-like" is the closest this machine gets to an
# AMD EPYC (AVX512-VNNI int8 in oneDNN, AVX2 float matrix products in MKL).
PATHS = {
    "native": {},
    "avx512-vnni (no AMX)": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI",
                             "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "epyc-like": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2 (no VNNI)": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

_CHILD = r"""
import json, sys
from yoloquant.config import load_config
from yoloquant.evaluate import evaluate_saved
from yoloquant.ptq import quantize
config_path, algo, save, out = sys.argv[1:5]
cfg = load_config(config_path)
cfg.PTQ.algo = algo
result = quantize(cfg, save)
scores = {r.runtime: r.map50_95 for r in evaluate_saved(cfg, save)}
json.dump({"scores": scores, "float_convs": sorted(result.summary["kept_float"]["conv_reasons"])},
          open(out, "w"))
"""


def run_path(config_path: str, algo: str, caps: dict, work: Path) -> dict:
    out = work / "result.json"
    env = {**os.environ, **caps, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", _CHILD, config_path, algo, str(work / "save"), str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/yolov5n_coco_mini.yaml")
    parser.add_argument("--algos", nargs="+", default=["avg", "KL", "emd", "abs_max"],
                        choices=PTQ_ALGOS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = []
    for algo in args.algos:
        for path in args.paths:
            with tempfile.TemporaryDirectory(prefix="yoloquant_cpu_paths_") as tmp:
                r = run_path(args.config_path, algo, PATHS[path], Path(tmp))
            onnx_map = r["scores"]["onnxruntime"]
            paddle_map = r["scores"]["paddle-inference(onednn-int8)"]
            rows.append({"algo": algo, "path": path, "caps": PATHS[path], "onnx": onnx_map,
                         "paddle": paddle_map, "gap": onnx_map - paddle_map,
                         "float_convs": r["float_convs"]})
            print(rows[-1], flush=True)
    lines = [f"INT8 mAP@0.5:0.95 on the evaluation set of {args.config_path} when oneDNN / MKL "
             "take a narrower code path (whole job rerun per path; ONNX Runtime's MLAS has no "
             "switch)", machine_line(), "",
             "| algo | code path | QDQ ONNX (ORT) | Paddle int8 | ONNX - Paddle (pts) | float convs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['path']} | {r['onnx']:.4f} | {r['paddle']:.4f} "
                     f"| {r['gap'] * 100:+.2f} | {len(r['float_convs'])} |")
    for algo in args.algos:
        mine = [r for r in rows if r["algo"] == algo]
        spread = {k: (max(r[k] for r in mine) - min(r[k] for r in mine)) * 100
                  for k in ("onnx", "paddle")}
        lines.append(f"| {algo} | spread over paths | {spread['onnx']:.2f} pts | "
                     f"{spread['paddle']:.2f} pts | max |gap| "
                     f"{max(abs(r['gap']) for r in mine) * 100:.2f} | |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config_path).stem
    (out / f"cpu_paths_{name}.md").write_text(table + "\n")
    write_json(out / f"cpu_paths_{name}.json", {"rows": rows, "versions": package_versions(),
                                                 "machine": machine()})


if __name__ == "__main__":
    main()
