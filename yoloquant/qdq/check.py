"""What ONNX Runtime really runs: the optimised graph's int8 kernels, and a quick latency probe."""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from ..errors import ModelError

INT8_CONV_OPS = {"QLinearConv", "ConvInteger"}


def _session(model_or_path, threads: int = 1, optimized_path: Optional[str] = None, level=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private exception types for bad models
        raise ModelError(f"ONNX Runtime cannot load the model: {exc}") from exc


def ort_int8_report(onnx_path_or_model) -> dict:
    """What ORT's CPU provider runs after full graph optimisation (ORT_ENABLE_ALL).

    Returns ``conv_total`` (Conv-like nodes), ``conv_int8`` (QLinearConv in any domain, e.g. the
    NHWC ``com.microsoft.QLinearConv``, or ConvInteger), ``conv_float`` (Conv, FusedConv, NCHWc
    Conv...), ``quantize`` / ``dequantize`` (QuantizeLinear/DequantizeLinear left),
    ``op_counts`` ({"domain:op": n} for all nodes) and ``float_conv_names``.
    """
    model = onnx_path_or_model
    if not isinstance(model, onnx.ModelProto):
        model = Path(model)
        if not model.is_file():
            raise ModelError(f"ONNX model not found: {model}")
    with tempfile.TemporaryDirectory(prefix="yoloquant_ort_") as tmp:
        opt_path = str(Path(tmp) / "optimized.onnx")
        _session(model, optimized_path=opt_path)
        opt = onnx.load(opt_path)
    counts = Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in opt.graph.node)
    convs = [n for n in opt.graph.node if "Conv" in n.op_type]
    int8 = [n for n in convs if n.op_type in INT8_CONV_OPS]
    flt = [n for n in convs if n.op_type not in INT8_CONV_OPS]
    return {
        "conv_total": len(convs),
        "conv_int8": len(int8),
        "conv_float": len(flt),
        "quantize": sum(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in opt.graph.node),
        "dequantize": sum(n.op_type == "DequantizeLinear" for n in opt.graph.node),
        "op_counts": dict(sorted(counts.items())),
        "float_conv_names": [n.name for n in flt],
    }


def _random_feed(session, rng) -> dict:
    feed = {}
    for inp in session.get_inputs():
        if inp.type != "tensor(float)":
            raise ModelError(f"latency(): input {inp.name!r} is {inp.type}; only float inputs are supported")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        feed[inp.name] = rng.random(shape, dtype=np.float32)
    return feed


def latency(*onnx_paths, runs: int = 30, threads: int = 2, warmup: int = 3, seed: int = 0) -> list[float]:
    """Median wall time (ms) of one inference per model, runs interleaved across the models.

    Interleaving spreads CPU frequency changes and noisy neighbours evenly over the models, so the
    medians are comparable. Inputs are random in [0, 1) with dynamic dimensions set to 1.
    """
    if not onnx_paths:
        raise ModelError("latency() needs at least one model")
    rng = np.random.default_rng(seed)
    sessions = [_session(p, threads=threads) for p in onnx_paths]
    feeds = [_random_feed(s, rng) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, f)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [float(np.median(t)) for t in times]
