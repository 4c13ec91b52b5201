"""Per-conv weight and activation statistics (statistic.csv): what makes a conv hard to quantize."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtime import OnnxRuntimeBackend
from ..stats import snr_db
from .images import EvalImages
from .measure import _with_outputs


def weight_statistics(w: np.ndarray, thresholds: np.ndarray) -> dict:
    """What makes a weight hard to quantize: outliers (abs-max/std, kurtosis), weights that
    round to zero on their channel's int8 grid, spread of channel ranges, rounding SNR."""
    w64 = w.astype(np.float64)
    flat = w64.ravel()
    std = float(flat.std())
    mean = float(flat.mean())
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    per_channel = t.size == w.shape[0] and t.size > 1
    scale = (t / 127.0).reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else t[0] / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(w64 / scale), -127, 127) * scale
    err = float(np.sum((q - w64) ** 2))
    ch_absmax = np.abs(w64.reshape(w.shape[0], -1)).max(axis=1)
    median = float(np.median(ch_absmax))
    central = flat - mean
    return {
        "weight_min": float(flat.min()), "weight_max": float(flat.max()),
        "weight_mean": mean, "weight_std": std,
        "weight_absmax_over_std": float(np.abs(flat).max() / std) if std > 0 else None,
        "weight_kurtosis": float(np.mean(central ** 4) / std ** 4 - 3.0) if std > 0 else None,
        "weight_zero_fraction": float(np.mean(np.abs(w64) < 0.5 * scale)),
        "weight_channel_spread": float(ch_absmax.max() / median) if median > 0 else None,
        "weight_rounding_snr_db": snr_db(err / float(np.sum(w64 ** 2))) if np.any(w64) else None,
    }


def activation_statistics(model: onnx.ModelProto, params: dict, images: EvalImages,
                          threads: Optional[int] = None) -> dict:
    """Per conv: its float input over the proxy images (range, std, share beyond the calibrated
    threshold), plus the calibrated input and output thresholds."""
    nodes = {n.name: n for n in model.graph.node}
    graph_inputs = {i.name for i in model.graph.input}
    tensors = sorted({nodes[name].input[0] for name in params} - graph_inputs)
    backend = OnnxRuntimeBackend.from_model(_with_outputs(model, tensors), threads=threads)
    # running sums per conv, so no image's activations are kept (tens of MB each)
    acc = {name: {"n": 0, "s1": 0.0, "s2": 0.0, "min": np.inf, "max": -np.inf, "clipped": 0}
           for name in params}
    for i in range(images.proxy_count):
        x = images.tensors[i][None]
        values = dict(zip(tensors, backend.session.run(tensors, {backend.input_name: x})))
        values.update(dict.fromkeys(graph_inputs, x))
        for name, p in params.items():
            a = values[nodes[name].input[0]].astype(np.float64).ravel()
            s = acc[name]
            s["n"] += a.size
            s["s1"] += float(a.sum())
            # not np.dot: OpenBLAS splits it over its threads, so OMP_NUM_THREADS (which
            # `import paddle` sets to 1) changed the last digits of act_std
            s["s2"] += float(np.einsum("i,i->", a, a))
            s["min"] = min(s["min"], float(a.min()))
            s["max"] = max(s["max"], float(a.max()))
            s["clipped"] += int(np.count_nonzero(np.abs(a) > p.input_threshold))
    out = {}
    for name, p in params.items():
        s = acc[name]
        mean = s["s1"] / s["n"]
        std = math.sqrt(max(s["s2"] / s["n"] - mean * mean, 0.0))
        absmax = max(abs(s["min"]), abs(s["max"]))
        out[name] = {
            "act_min": s["min"], "act_max": s["max"], "act_std": std,
            "act_absmax_over_std": absmax / std if std > 0 else None,
            "act_threshold": float(p.input_threshold),
            "act_clipped_fraction": s["clipped"] / s["n"],
            "out_threshold": None if p.output_threshold is None else float(p.output_threshold),
        }
    return out


def layer_statistics(cal, layers: list[str], images: EvalImages,
                     threads: Optional[int] = None) -> dict:
    inits = {i.name: i for i in cal.onnx_model.graph.initializer}
    nodes = {n.name: n for n in cal.onnx_model.graph.node}
    params = {p.node_name: p for p in cal.conv_params if p.node_name in set(layers)}
    acts = activation_statistics(cal.onnx_model, params, images, threads)
    stats = {}
    for name in layers:
        w = numpy_helper.to_array(inits[nodes[name].input[1]])
        stats[name] = {"weight_shape": "x".join(map(str, w.shape)),
                       **weight_statistics(w, params[name].weight_thresholds), **acts[name]}
    return stats

