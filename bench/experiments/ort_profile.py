"""Where ONNX Runtime spends its time: per-op-type share of node time (ORT profiler), 1 thread.

  python bench/experiments/ort_profile.py MODEL.onnx [MODEL2.onnx ...] [--runs 20]

One thread and no spinning so node times are compute, not waiting; the machine is shared, so
read the shares, not the absolute milliseconds.
"""
import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

parser = argparse.ArgumentParser()
parser.add_argument("models", nargs="+")
parser.add_argument("--runs", type=int, default=20)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
for path in args.models:
    with tempfile.TemporaryDirectory() as tmp:
        o = ort.SessionOptions()
        o.intra_op_num_threads = args.threads
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(tmp, "prof")
        o.log_severity_level = 3
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape],
                                            dtype=np.float32)
        for _ in range(3 + args.runs):
            s.run(None, {inp.name: x})
        events = json.load(open(s.end_profiling()))
    by_op = defaultdict(float)
    count = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] += e["dur"]
            count[op] += 1
    runs = 3 + args.runs
    total = sum(by_op.values())
    print(f"\n{Path(path).name}: {total / runs / 1000:.1f} ms node time per run")
    for op, d in sorted(by_op.items(), key=lambda kv: -kv[1]):
        print(f"  {op:<22} {d / runs / 1000:7.2f} ms  {100 * d / total:5.1f}%  x{count[op] // runs}")
