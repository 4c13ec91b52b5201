"""Measurements equalization decides by, all on a few calibration images with ONNX Runtime:
per-channel ranges of tensors, the 8-bit error of a conv against the ORIGINAL float model, and
the head-output SNR of a model against the original.

The 8-bit simulation is the deployed one (per-tensor input grid, int8 weights per channel or,
with `weight_quantize_type: abs_max`, per tensor; precision.py's probe) with abs-max thresholds: the calibration algorithm runs later, on the
equalized model, so its thresholds do not exist yet; avg (the default) is the mean of
per-image abs-max, close to it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..fidelity import output_noise
from ..precision import DEAD_CHANNEL, _probe_model, _session_without_rewrites
from ..qdq import ConvQuantParams
from ..runtime import session_with_outputs
from ..stats import snr_db


def feed(img, input_name: str) -> dict:
    """An image (CHW) as the input of `input_name`, or a ready {name: tensor} feed (a pair's
    subgraph has several inputs)."""
    if isinstance(img, dict):
        return img
    return {input_name: np.asarray(img, np.float32)[None]}


def _run(session, names: list, images: Sequence, input_name: str):
    for img in images:
        yield dict(zip(names, session.run(names, feed(img, input_name))))


def channel_absmax(model: onnx.ModelProto, tensors: Sequence[str], images: Sequence[np.ndarray],
                   input_name: str) -> dict[str, np.ndarray]:
    """{tensor: per-channel (axis 1) max |x| over the images}."""
    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    found = {}
    for values in _run(session_with_outputs(model, names), names, images, input_name):
        for n in names:
            v = np.abs(values[n]).astype(np.float64)
            m = v.max(axis=tuple(i for i in range(v.ndim) if i != 1))
            found[n] = m if n not in found else np.maximum(found[n], m)
    return found


def absmax_params(model: onnx.ModelProto, convs: Sequence[str], images: Sequence[np.ndarray],
                  input_name: str, per_channel: bool = True) -> list[ConvQuantParams]:
    """8-bit parameters of `convs`: abs-max input threshold over the images, abs-max weight
    thresholds per output channel (or one per tensor)."""
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    ranges = channel_absmax(model, [by_name[c].input[0] for c in convs], images, input_name)
    params = []
    for c in convs:
        w = numpy_helper.to_array(inits[by_name[c].input[1]]).astype(np.float64)
        params.append(ConvQuantParams(
            node_name=c, input_threshold=max(float(ranges[by_name[c].input[0]].max()), 1e-8),
            weight_thresholds=np.abs(w).reshape(w.shape[0], -1).max(axis=1) if per_channel
            else np.array([np.abs(w).max()])))
    return params


def layer_error_db(reference: onnx.ModelProto, model: onnx.ModelProto, convs: Sequence[str],
                   out_scale: dict[str, np.ndarray], images: Sequence[np.ndarray],
                   input_name: str, per_channel: bool = True) -> dict[str, float]:
    """{conv: SNR in dB of its 8-bit output in `model` against its float output in `reference`}.

    As precision.layer_snr (error power over the channel's variance, averaged over live output
    channels), except that the float output is the ORIGINAL model's: an approximate rewrite's
    float error counts as error. `out_scale[conv]`: the factor per output channel that brings
    the conv's output in `model` back to the reference's units (1 unless the conv is itself the
    first conv of an equalized pair)."""
    if not convs:
        return {}
    by_name = {n.name: n for n in reference.graph.node}
    outs = [by_name[c].output[0] for c in convs]
    ref_session = session_with_outputs(reference, outs)
    probe, pairs = _probe_model(model, absmax_params(model, convs, images, input_name, per_channel))
    names = [t for _, y, y_q in pairs for t in (y, y_q)]
    session = _session_without_rewrites(probe)
    sums: dict[str, list] = {c: [0, 0.0, 0.0, 0.0] for c in convs}
    for img in images:
        ref = dict(zip(outs, ref_session.run(outs, feed(img, input_name))))
        got = dict(zip(names, session.run(names, feed(img, input_name))))
        for conv, y, y_q in pairs:
            f = ref[y].astype(np.float64)
            scale = out_scale.get(conv)
            q = got[y_q].astype(np.float64)
            if scale is not None:
                q = q * scale.reshape((1, -1) + (1,) * (q.ndim - 2))
            axes = (0,) + tuple(range(2, f.ndim))
            acc = sums[conv]
            acc[0] += f.size // f.shape[1]
            acc[1] = acc[1] + f.sum(axis=axes)
            acc[2] = acc[2] + (f * f).sum(axis=axes)
            acc[3] = acc[3] + ((q - f) ** 2).sum(axis=axes)
    result = {}
    for conv, (n, s1, s2, se) in sums.items():
        var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
        live = var > DEAD_CHANNEL * max(float(var.mean()), 1e-30)
        nsr = float(((se / n)[live] / var[live]).mean()) if live.any() else 0.0
        result[conv] = snr_db(nsr)
    return result


def head_outputs(model: onnx.ModelProto, images: Sequence[np.ndarray], input_name: str) -> list:
    session = _session_without_rewrites(model)
    return [session.run(None, {input_name: np.asarray(img, np.float32)[None]})[0] for img in images]


def head_snr_db(reference: list, candidate: list) -> float:
    """SNR of the candidate's head outputs against the reference's (mean of the box and score
    parts' noise-to-signal ratios, as yoloquant.fidelity)."""
    signal = noise = 0.0
    for r, c in zip(reference, candidate):
        s, e = output_noise(r, c)
        signal, noise = signal + s, noise + e
    with np.errstate(divide="ignore", invalid="ignore"):
        nsr = float(np.mean(noise / np.maximum(signal, 1e-300)))
    return snr_db(nsr)


def max_relative_diff(reference: list, candidate: list) -> float:
    """max |candidate - reference| over the images, relative to the reference's value range."""
    worst = 0.0
    for r, c in zip(reference, candidate):
        span = float(r.max() - r.min()) or 1.0
        worst = max(worst, float(np.abs(c.astype(np.float64) - r).max()) / span)
    return worst
