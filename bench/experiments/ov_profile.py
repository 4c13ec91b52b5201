"""OpenVINO per-layer-type time (PERF_COUNT) of models, 1 thread: what runs in int8, what not.

  python bench/experiments/ov_profile.py MODEL.onnx [...] [--runs 20]
"""
import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import openvino as ov

parser = argparse.ArgumentParser()
parser.add_argument("models", nargs="+")
parser.add_argument("--runs", type=int, default=20)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
core = ov.Core()
for path in args.models:
    model = core.read_model(path)
    cm = core.compile_model(model, "CPU", {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": str(args.threads),
                                           "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1",
                                           "PERFORMANCE_HINT": "LATENCY"})
    req = cm.create_infer_request()
    x = np.random.default_rng(0).random(tuple(model.inputs[0].get_partial_shape().to_shape()), dtype=np.float32)
    acc = defaultdict(float)
    cnt = defaultdict(int)
    for i in range(3 + args.runs):
        req.infer({0: x})
        if i < 3:
            continue
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                key = f"{p.node_type}/{p.exec_type}"
                acc[key] += p.real_time.total_seconds() * 1000
                cnt[key] += 1
    total = sum(acc.values())
    print(f"\n{Path(path).name}: {total / args.runs:.1f} ms layer time per run")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {k:<44} {v / args.runs:7.2f} ms {100 * v / total:5.1f}%  x{cnt[k] // args.runs}")
