"""ONNX Runtime session options and threads on FP32 vs INT8 QDQ models, interleaved.

  python bench/experiments/ort_options.py FP32.onnx INT8.onnx [MORE.onnx ...] [--rounds 30]

Variants per model: default (ORT_ENABLE_ALL, spinning, 2 threads), no spinning, 1 thread,
ORT_ENABLE_EXTENDED (no NCHWc / NHWC layout transformers), QDQ cleanup on.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from speed import Artifact, Candidate, OrtBackend, stats, time_interleaved  # noqa: E402

VARIANTS = {
    "default(all,spin,2t)": dict(threads=2),
    "nospin,2t": dict(threads=2, spinning=False),
    "spin,1t": dict(threads=1),
    "extended,2t": dict(threads=2, level="extended"),
    "qdq_cleanup,2t": dict(threads=2, extra={"session.enable_quant_qdq_cleanup": "1"}),
}

parser = argparse.ArgumentParser()
parser.add_argument("models", nargs="+")
parser.add_argument("--rounds", type=int, default=30)
parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
args = parser.parse_args()
cands = []
for m in args.models:
    for v in args.variants:
        kw = VARIANTS[v]
        c = Candidate(Artifact(Path(m).name, "?"), v, None)
        c.backend = OrtBackend(Path(m), kw["threads"], kw.get("spinning", True),
                               kw.get("level", "all"), kw.get("extra"))
        cands.append(c)
shape = [d if isinstance(d, int) else 1 for d in cands[0].backend.input_shape]
x = np.random.default_rng(0).random(shape, dtype=np.float32)
time_interleaved(cands, x, args.rounds, warmup=3)
base = {}
for c in cands:
    s = stats(c.times)
    base.setdefault(c.runtime, s["median_ms"])
    print(f"{c.artifact.label:<28} {c.runtime:<22} median {s['median_ms']:7.1f}  "
          f"p10-p90 {s['p10_ms']:6.1f}-{s['p90_ms']:6.1f}  vs first model {s['median_ms'] / base[c.runtime]:.2f}")
