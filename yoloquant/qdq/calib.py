"""A quick abs-max calibration (for tests and experiments; real scales come from Paddle PTQ)."""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError
from .check import _session
from .graph import _find_convs
from .params import ConvQuantParams

def conv_abs_max(model: onnx.ModelProto, batches: Iterable[dict], conv_names: Optional[Sequence[str]] = None) -> dict:
    """{conv name: (input abs-max, raw output abs-max, weight abs-max per output channel)} from
    running the float model with ONNX Runtime on ``batches`` (each a feed dict)."""
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv" and (conv_names is None or n.name in conv_names)]
    if conv_names is not None:
        _find_convs(graph, [_NameOnly(c) for c in conv_names])
    inits = {i.name: i for i in graph.initializer}
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    wanted = []
    for n in convs:
        for t in (n.input[0], n.output[0]):
            if t not in wanted:
                wanted.append(t)
    inputs = {i.name for i in probe.graph.input}
    for t in wanted:
        if t not in existing and t not in inputs:
            # Type/shape are left unknown: ORT accepts outputs declared without shape.
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
    sess = _session(probe, threads=2, level=_no_opt())
    out_names = [o.name for o in sess.get_outputs()]
    amax: dict[str, float] = defaultdict(float)
    n_batches = 0
    for feed in batches:
        n_batches += 1
        values = dict(zip(out_names, sess.run(None, feed)))
        values.update(feed)
        for t in wanted:
            amax[t] = max(amax[t], float(np.abs(values[t]).max()))
    if n_batches == 0:
        raise ModelError("conv_abs_max() got no calibration batches")
    result = {}
    for n in convs:
        if n.input[1] not in inits:
            raise ModelError(f"Conv {n.name!r}: weight {n.input[1]!r} is not an initializer")
        w = numpy_helper.to_array(inits[n.input[1]])
        result[n.name] = (amax[n.input[0]], amax[n.output[0]], np.abs(w.reshape(w.shape[0], -1)).max(axis=1))
    return result


def _no_opt():
    import onnxruntime as ort

    # Unoptimised graph: every intermediate tensor we asked for still exists.
    return ort.GraphOptimizationLevel.ORT_DISABLE_ALL


@dataclass(frozen=True)
class _NameOnly:
    node_name: str


def abs_max_params(model: onnx.ModelProto, batches: Iterable[dict], with_output: bool = True,
                   skip_output: Sequence[str] = ()) -> list[ConvQuantParams]:
    """ConvQuantParams for every Conv from abs-max calibration: input and (when ``with_output``)
    raw output thresholds, per-channel weight thresholds. Convs named in ``skip_output`` get no
    output threshold (ORT then runs them in float)."""
    stats = conv_abs_max(model, batches)
    params = []
    for name, (a_in, a_out, w_max) in stats.items():
        params.append(ConvQuantParams(
            node_name=name,
            input_threshold=max(a_in, 1e-8),
            weight_thresholds=w_max,
            output_threshold=max(a_out, 1e-8) if with_output and name not in skip_output else None,
        ))
    return params


def tensor_ranges(model: onnx.ModelProto, images: Iterable[np.ndarray], input_name: str,
                  tensors: Optional[Sequence[str]] = None) -> dict[str, tuple[float, float]]:
    """(min, max) of every float intermediate tensor (or of ``tensors``) over ``images`` (CHW
    float arrays), running the float model with ONNX Runtime, graph unoptimised. These are the
    grids of the glue between convs (MinMax, as ORT's quantizer measures them); the conv inputs
    keep the thresholds the calibration algorithm chose."""
    probe = copy.deepcopy(model)
    existing = {o.name for o in probe.graph.output}
    consts = {i.name for i in probe.graph.initializer}
    names = list(tensors) if tensors is not None else [
        o for n in probe.graph.node if n.op_type != "Constant" for o in n.output if o and o not in consts]
    for t in names:
        if t not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(t))
            existing.add(t)
    sess = _session(probe, threads=2, level=_no_opt())
    out_names = [o.name for o in sess.get_outputs()]
    wanted = set(names)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    count = 0
    for img in images:
        count += 1
        for name, v in zip(out_names, sess.run(None, {input_name: np.asarray(img, np.float32)[None]})):
            # float32 only: Q/DQ take float32 (a float64 or int tensor is shape arithmetic)
            if name not in wanted or np.asarray(v).dtype != np.float32 or v.size == 0:
                continue
            lo[name] = min(lo.get(name, np.inf), float(v.min()))
            hi[name] = max(hi.get(name, -np.inf), float(v.max()))
    if count == 0:
        raise ModelError("tensor_ranges() got no images")
    return {t: (lo[t], hi[t]) for t in lo}
