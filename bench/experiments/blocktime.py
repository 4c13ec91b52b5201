"""Does Paddle's Intel OpenMP (idle threads spin KMP_BLOCKTIME=200 ms by default) slow the next
candidate in an interleaved benchmark?  Run twice: KMP_BLOCKTIME unset and KMP_BLOCKTIME=0.

  python bench/experiments/blocktime.py ART_DIR [rounds]

Times ONNX Runtime FP32 alone (each run preceded by an ORT run) and right after a Paddle run.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from speed import OrtBackend, paddle_backend  # noqa: E402

art = Path(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
fp32 = OrtBackend(Path(os.environ.get("FP32", "/work/shared/assets/models/yolov5n.onnx")), 2)
pd = paddle_backend(art / "yoloquant/model.pdmodel", art / "yoloquant/model.pdiparams", 2, int8=True)
x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
for _ in range(3):
    fp32(x), pd(x)
after_ort, after_pd, pd_t = [], [], []
for _ in range(rounds):
    fp32(x)
    t = time.perf_counter(); fp32(x); after_ort.append(time.perf_counter() - t)
    t = time.perf_counter(); pd(x); pd_t.append(time.perf_counter() - t)
    t = time.perf_counter(); fp32(x); after_pd.append(time.perf_counter() - t)
med = lambda v: f"{np.median(v) * 1000:.1f} ms"  # noqa: E731
print(f"KMP_BLOCKTIME={os.environ.get('KMP_BLOCKTIME')}: ORT fp32 after ORT {med(after_ort)}, "
      f"after Paddle {med(after_pd)}; Paddle int8 {med(pd_t)}; load {os.getloadavg()[0]:.1f}")
