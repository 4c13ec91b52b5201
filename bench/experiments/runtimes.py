"""Interleaved latency (wall and process CPU ms) of models on ORT / OpenVINO / Paddle variants.

  python bench/experiments/runtimes.py --rounds 30 \
      ort:2:fp32.onnx ort-spin:2:fp32.onnx ov:2:ours.onnx ov-bf16:2:fp32.onnx \
      pd:2:DIR/model.pdmodel pd8:2:DIR/model.pdmodel ...

Each spec is RUNTIME:THREADS:PATH. Runtimes: ort (no spinning), ort-spin, ov (f32 for float
layers), ov-bf16, pd (oneDNN fp32), pd8 (oneDNN int8, convs only), pd8-all (+ pool2d, concat,
elementwise_add, ... in int8).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from speed import (Artifact, Candidate, OpenVinoBackend, OrtBackend, paddle_backend,  # noqa: E402
                   stats, time_interleaved)


def paddle_custom(model: Path, threads: int, ops: set):
    from paddle import inference

    from yoloquant.runtime import PaddleInferenceBackend, PaddleModelFiles

    b = PaddleInferenceBackend.__new__(PaddleInferenceBackend)
    config = inference.Config(str(model), str(model.with_suffix(".pdiparams")))
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    config.switch_ir_optim(True)
    config.enable_mkldnn()
    config.enable_mkldnn_int8(ops)
    b.predictor = inference.create_predictor(config)
    b.input_handle = b.predictor.get_input_handle(b.predictor.get_input_names()[0])
    b.output_handle = b.predictor.get_output_handle(b.predictor.get_output_names()[0])
    b.files = PaddleModelFiles(model, model.with_suffix(".pdiparams"))
    return b


def make(rt: str, threads: int, path: Path):
    if rt == "ort":
        return OrtBackend(path, threads, spinning=False)
    if rt == "ort-spin":
        return OrtBackend(path, threads, spinning=True)
    if rt == "ov":
        return OpenVinoBackend(path, threads)
    if rt == "ov-bf16":
        return OpenVinoBackend(path, threads, precision="bf16")
    if rt in ("pd", "pd8"):
        return paddle_backend(path, path.with_suffix(".pdiparams"), threads, int8=rt == "pd8")
    if rt == "pd8-all":
        return paddle_custom(path, threads, {"conv2d", "depthwise_conv2d", "pool2d", "concat",
                                             "elementwise_add", "elementwise_mul", "nearest_interp",
                                             "nearest_interp_v2", "transpose2", "reshape2"})
    raise SystemExit(f"unknown runtime {rt}")


parser = argparse.ArgumentParser()
parser.add_argument("specs", nargs="+")
parser.add_argument("--rounds", type=int, default=30)
parser.add_argument("--size", type=int, default=640)
args = parser.parse_args()
cands = []
for spec in args.specs:
    rt, threads, path = spec.split(":", 2)
    c = Candidate(Artifact(Path(path).parent.name + "/" + Path(path).name, "?"), f"{rt}:{threads}t", None)
    c.backend = make(rt, int(threads), Path(path))
    cands.append(c)
x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
time_interleaved(cands, x, args.rounds, warmup=3)
first = None
for c in cands:
    s = stats(c.times, c.cpu_times)
    first = first or s
    print(f"{c.artifact.label:<34} {c.runtime:<12} wall {s['median_ms']:7.1f} "
          f"({s['p10_ms']:6.1f}-{s['p90_ms']:6.1f})  cpu {s['cpu_median_ms']:7.1f}  "
          f"x first: wall {s['median_ms'] / first['median_ms']:.2f} cpu {s['cpu_median_ms'] / first['cpu_median_ms']:.2f}")
