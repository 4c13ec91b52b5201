"""Hessian-aware weight rounding (GPTQ, Frantar et al. 2022) for the int8 convs: one shot, no
training, a few seconds on yolov5n.

Round-to-nearest treats every weight alone. GPTQ rounds one input column of a conv's weight
matrix W (C_out x C_in*k*k) at a time and spreads that column's rounding error over the columns
not yet rounded, weighted by how the layer's inputs correlate (H = E[x x^T] over input patches
of the calibration images), so that the error of the conv's *output* W x is small, not that of
each weight. Scales are unchanged (the calibrated per-channel thresholds); only which of the two
neighbouring grid points each weight takes changes, plus the occasional step further when the
compensation has moved a weight. Both exported models get the same int8 values.

Measured on yolov5n (avg, 32 images): weight-induced conv output error 7 dB lower on average.
Details that matter:

* H is estimated from the *float* network's conv inputs (one ONNX Runtime pass), with at most
  ``MAX_PATCHES`` random output positions per image: enough rows for the largest yolov5n conv
  (2304 columns), and bounded time on the 320x320 early layers.
* ``DAMP`` (1% of H's mean diagonal) keeps H invertible for inputs with (nearly) dead channels.
* Grouped / depthwise convs are rounded group by group, each with its own H.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .qdq import QMAX as WQMAX  # the weight grid insert_qdq writes: clip(round(w / s), -127, 127)

log = logging.getLogger("yoloquant")

MAX_PATCHES = 2048  # sampled output positions per image and conv
DAMP = 0.01  # fraction of mean(diag(H)) added to H's diagonal
BLOCK = 64  # columns rounded between two updates of the remaining columns


def _conv_geometry(node: onnx.NodeProto, weight_shape: tuple) -> dict:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise ModelError(f"Conv {node.name!r} uses auto_pad={auto_pad}; GPTQ needs explicit pads "
                         "(set weight_rounding: nearest for this model)")
    if len(weight_shape) != 4:
        raise ModelError(f"Conv {node.name!r}: GPTQ handles 2-D convs only, weight shape {weight_shape}")
    return {"kernel": tuple(weight_shape[2:]),
            "strides": tuple(attrs.get("strides", (1, 1))),
            "pads": tuple(attrs.get("pads", (0, 0, 0, 0))),
            "dilations": tuple(attrs.get("dilations", (1, 1))),
            "group": int(attrs.get("group", 1))}


def sample_patches(x: np.ndarray, geometry: dict, count: int, rng) -> np.ndarray:
    """Up to `count` input patches of a conv, rows ordered as the flattened weight's columns
    (channel, kernel row, kernel column): shape (patches, C_in*kh*kw). `x` is one image, (C, H, W)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = (geometry["kernel"], geometry["strides"],
                                                      geometry["pads"], geometry["dilations"])
    padded = np.pad(x, ((0, 0), (pt, pb), (pl, pr))) if pt or pb or pl or pr else x
    out_h = (padded.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[2] - (kw - 1) * dw - 1) // sw + 1
    positions = np.arange(out_h * out_w)
    if positions.size > count:
        positions = rng.choice(positions, size=count, replace=False)
    rows = (positions // out_w) * sh
    cols = (positions % out_w) * sw
    if kh == kw == 1:  # pointwise conv: a patch is one pixel's channels
        # (patches, C) Fortran-ordered, the layout BLAS reads without a copy
        return padded[:, rows, cols].T
    # (patches, kh, kw) pixel coordinates, then gather (C, patches, kh, kw) in one indexing step
    r = rows[:, None, None] + (np.arange(kh) * dh)[None, :, None]
    c = cols[:, None, None] + (np.arange(kw) * dw)[None, None, :]
    patches = padded[:, r, c]
    return np.ascontiguousarray(patches.transpose(1, 0, 2, 3)).reshape(positions.size, -1)


def gptq_round(weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray,
               damp: float = DAMP) -> np.ndarray:
    """int8 values (same shape as `weight`, (C_out, D)) chosen by GPTQ for the per-row `scale`,
    given H = E[x x^T] (D x D) of the inputs."""
    w = np.array(weight, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    d = w.shape[1]
    if h.shape != (d, d):
        raise ModelError(f"GPTQ: Hessian shape {h.shape} does not match {d} weight columns")
    dead = np.diag(h) <= 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(d)] += damp * float(np.mean(np.diag(h)))
    # upper Cholesky factor of H^-1: row i holds how the later columns absorb column i's error
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    q = np.empty_like(w)
    # columns in blocks: within a block the error is spread column by column, to the columns
    # after the block once per block (one matrix product instead of BLOCK rank-1 updates)
    for b0 in range(0, d, BLOCK):
        b1 = min(b0 + BLOCK, d)
        block = w[:, b0:b1].copy()
        errors = np.empty_like(block)
        for i in range(b1 - b0):
            k = b0 + i
            q[:, k] = np.clip(np.round(block[:, i] / s), -WQMAX, WQMAX)
            errors[:, i] = (block[:, i] - q[:, k] * s) / u[k, k]
            block[:, i + 1:] -= np.outer(errors[:, i], u[k, k + 1:b1])
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return q.astype(np.int8)


def input_hessians(model: onnx.ModelProto, conv_names: Sequence[str], images: Sequence[np.ndarray],
                   input_name: str, max_patches: int = MAX_PATCHES, seed: int = 0) -> dict:
    """{conv name: [H of each group]}, H = mean of x x^T over sampled input patches of the float
    network on `images`."""
    from scipy.linalg.blas import ssyrk

    from .runtime import session_with_outputs

    nodes = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    inits = {i.name: i for i in model.graph.initializer}
    missing = [n for n in conv_names if n not in nodes]
    if missing:
        raise ModelError(f"GPTQ: no Conv named {missing[0]!r} in the model")
    geometry = {}
    for name in conv_names:
        node = nodes[name]
        if node.input[1] not in inits:
            raise ModelError(f"Conv {name!r}: weight {node.input[1]!r} is not an initializer")
        geometry[name] = _conv_geometry(node, tuple(inits[node.input[1]].dims))
    graph_inputs = {i.name for i in model.graph.input}
    fetch = sorted({nodes[n].input[0] for n in conv_names} - graph_inputs)
    session = session_with_outputs(model, fetch)
    rng = np.random.default_rng(seed)
    sums: dict[str, list] = {}
    rows = dict.fromkeys(conv_names, 0)
    for image in images:
        values = dict(zip(fetch, session.run(fetch, {input_name: image[None]})))
        values[input_name] = image[None]
        for name in conv_names:
            x = values[nodes[name].input[0]][0]
            g = geometry[name]["group"]
            patches = sample_patches(x, geometry[name], max_patches, rng)
            per_group = np.split(patches, g, axis=1)  # columns are channel-major
            acc = sums.setdefault(name, [np.zeros((p.shape[1],) * 2) for p in per_group])
            for k, p in enumerate(per_group):
                # upper triangle of p^T p (syrk: half a matrix product's work; given the
                # operand in Fortran order BLAS reads it without a copy: ~4x faster than p.T @ p)
                acc[k] += (ssyrk(1.0, p, trans=1) if p.flags.f_contiguous
                           else ssyrk(1.0, p.T, trans=0))
            rows[name] += patches.shape[0]
    return {name: [_symmetric(h) / max(rows[name], 1) for h in sums.get(name, [])]
            for name in conv_names}


def _symmetric(upper: np.ndarray) -> np.ndarray:
    return np.triu(upper) + np.triu(upper, 1).T


def gptq_weights(model: onnx.ModelProto, params: Sequence, images: Sequence[np.ndarray],
                 input_name: str, max_patches: int = MAX_PATCHES, seed: int = 0) -> dict[str, np.ndarray]:
    """{conv name: int8 weight (the weight's shape)} for every ConvQuantParams in `params`;
    `seed` picks the sampled patch positions."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    hessians = input_hessians(model, [p.node_name for p in params], images, input_name, max_patches,
                              seed)
    out = {}
    for p in params:
        w = numpy_helper.to_array(inits[nodes[p.node_name].input[1]])
        c_out, groups = w.shape[0], len(hessians[p.node_name])
        t = p.weight_thresholds
        if t.size not in (1, c_out):
            raise ModelError(f"Conv {p.node_name!r}: {t.size} weight thresholds for {c_out} channels")
        # as qdq._quantize_weight: a zero threshold is a dead channel, quantized to 0
        scale = np.broadcast_to(np.where(t > 0, t / WQMAX, 1.0), (c_out,))
        flat = w.reshape(c_out, -1)
        per = c_out // groups
        q = np.concatenate([gptq_round(flat[k * per:(k + 1) * per], hessians[p.node_name][k],
                                       scale[k * per:(k + 1) * per]) for k in range(groups)])
        q[np.broadcast_to(t <= 0, (c_out,))] = 0
        out[p.node_name] = q.reshape(w.shape)
    return out
