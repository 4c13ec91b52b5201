"""What each runtime really runs, for bench/speed.py: int8 vs float kernel counts and a time
profile per op type (ORT's profiler; OpenVINO's per-layer PERF_COUNT)."""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

# ORT ops that compute on int8 codes (QLinear* kernels, and the ops ORT runs on uint8 once the
# Q/DQ around them are dropped: MaxPool in NHWC, Resize, Transpose, Reshape ... on u8 tensors)
ORT_QDQ = ("QuantizeLinear", "DequantizeLinear")
ORT_LAYOUT = ("Transpose", "ReorderInput", "ReorderOutput", "Reshape", "Squeeze", "Unsqueeze",
              "Flatten", "Gather", "Cast", "Shape", "Slice", "Split")


def ort_kernels(optimized_model) -> dict:
    """{int8, float, qdq}: compute nodes of ORT's optimised graph by precision. A node is int8
    when it is a QLinear*/integer kernel or reads a tensor on the uint8/int8 grid; layout-only
    nodes (Transpose, Reorder*, Reshape...) and Q/DQ are counted apart."""
    graph = optimized_model.graph
    int_tensors = set()
    for n in graph.node:  # in topological order: propagate 'this tensor holds codes'
        if n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear") or (
                n.op_type in ("NhwcMaxPool", "MaxPool", "Resize", *ORT_LAYOUT)
                and n.input and n.input[0] in int_tensors):
            int_tensors.update(n.output)
    counts = {"int8": 0, "float": 0, "qdq": 0, "layout": 0}
    for n in graph.node:
        if n.op_type in ORT_QDQ:
            counts["qdq"] += 1
        elif n.op_type in ORT_LAYOUT:
            counts["layout"] += 1
        elif n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or (
                n.input and n.input[0] in int_tensors):
            counts["int8"] += 1
        else:
            counts["float"] += 1
    return counts


def ov_kernels(layer_info: list[dict]) -> dict:
    """{int8, float, other}: layers of OpenVINO's compiled graph by the precision they run in."""
    counts = {"int8": 0, "float": 0, "other": 0}
    for info in layer_info:
        if info["type"] in ("Parameter", "Result", "Constant"):
            continue
        if info["precision"] in ("u8", "i8"):
            counts["int8"] += 1
        elif info["precision"] in ("f32", "bf16", "f16"):
            counts["float"] += 1
        else:
            counts["other"] += 1
    return counts


def ort_profile(path: Path, threads: int, image: np.ndarray, runs: int = 10) -> dict:
    """{op type: ms per run} from ORT's profiler (no spinning, so node times are compute)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ortprof_") as tmp:
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        o.enable_profiling = True
        o.profile_file_prefix = os.path.join(tmp, "prof")
        o.log_severity_level = 3
        session = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: image})  # warm-up, profiled too: dropped below by 'runs'
        for _ in range(runs):
            session.run(None, {name: image})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1000.0
    return _per_run(per_op, runs + 1)


def ov_profile(path: Path, threads: int, image: np.ndarray, runs: int = 10) -> dict:
    """{"layer type (kernel precision)": ms per run} from OpenVINO's PERF_COUNT."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads),
        "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    x = np.ascontiguousarray(image, dtype=np.float32)
    request.infer({0: x})
    per_op = defaultdict(float)
    for _ in range(runs):
        request.infer({0: x})
        for info in request.get_profiling_info():
            if info.status != info.Status.EXECUTED:
                continue
            kernel = info.exec_type.split("_")[-1] if "_" in info.exec_type else info.exec_type
            per_op[f"{info.node_type} ({kernel})"] += info.real_time.total_seconds() * 1000.0
    return _per_run(per_op, runs)


def _per_run(per_op: dict, runs: int) -> dict:
    return {k: round(v / runs, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def profile_line(profile: dict, top: int = 8) -> str:
    total = sum(profile.values())
    parts = [f"{k} {v:.1f}" for k, v in list(profile.items())[:top]]
    return f"{total:.1f} ms: " + ", ".join(parts)
