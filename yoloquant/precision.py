"""Which convs can run in 8 bits, decided from measurements on the calibration images.

Why (measured on YOLOX-nano, val2017_mini, float mAP@0.5:0.95 0.2999; every conv quantized
with Paddle's 'avg' thresholds gave 0.0027 in ONNX Runtime and 0.0862 in Paddle oneDNN int8):
activations are quantized per tensor, so a tensor whose channels span very different ranges
loses its small channels. In YOLOX-nano the stem conv (after the Focus space-to-depth, on
unnormalised 0-255 input) produces channels with abs-max from 0.16 to 139.6; its per-tensor
step (0.74 for the next conv's input, 1.1 for its requantized output) rounds five of the
16 channels to almost nothing, and the depthwise conv reading them multiplies exactly those
channels by weights up to 11.4 (the folded BatchNorm restores their scale). Quantizing that one
tensor alone took the head outputs to 0.3-7 dB SNR. Depthwise convs are where this shows: each
output channel sees one input channel, so nothing averages the loss out. Pointwise convs of the
same model lose 25-33 dB; depthwise ones -2 to 32 dB.

The measurement (``layer_snr``): each conv is run twice on the same float input, once float and
once with its input and weights quantized as deployed (per-tensor input grid from the
calibrated threshold: [-T, T], or [max(min, -T), T] when the deploy_backend's QDQ ONNX puts conv
inputs on asymmetric uint8 grids, ``qdq.rules``; per-channel int8 weights). Per output channel, the error power relative
to the channel's variance; averaged over live channels (dead ones, with no variance, carry no
information); in dB. Channels are averaged, not pooled, because after the folded BatchNorm of
the next layer every channel matters by its own scale: one channel lost of 16 is a 12 dB
layer even if that channel's values were tiny. One forward pass of a model holding both
copies of every conv, on a few images: a few seconds.

Convs under ``MIN_LAYER_SNR_DB`` (config ``min_layer_snr_db``) stay float in both runtimes; so
do the regression prediction convs (``head.regression_convs``, config ``keep_regression_float``).
Measured on val2017_mini with 'avg' calibration on 32 train images:
- YOLOX-nano: 19 convs under the threshold (most of them depthwise) + 3 regression convs, of 113.
  mAP 0.2949 in ONNX Runtime, 0.2880 in Paddle oneDNN int8 (float 0.2999); with every conv
  quantized 0.003 / 0.086 (tests/test_ptq.py::test_yolox_nano_int8_keeps_accuracy_in_both_runtimes).
- YOLOv5n: 4 of 60 convs under the threshold (21.5-23.7 dB: /model.1, /model.2 cv1 and cv2,
  /model.10).

Bias correction (``conv_bias_correction``, off by default): the same probe gives each channel's
mean output error, which a bias shift removes; the SNR that decides float convs is then the one
after correction, so fewer convs stay float (yolov5n avg: 1 instead of 4). Measured on yolov5n,
avg, 32 images, ONNX / Paddle int8 mAP on val2017_mini (float 0.3087) and on the 134
train2017_mini images not used for calibration (float 0.3170):
  no correction (4 float convs)        val 0.3010 / 0.2972   held-out 0.3132 / 0.3168
  correction (1 float conv)            val 0.3047 / 0.3049   held-out 0.3066 / 0.3088
  every conv int8, without / with it   val 0.3019 / 0.2963 -> 0.3001 / 0.3007,
                                       held-out 0.3093 / 0.3091 -> 0.3081 / 0.3159
i.e. differences of the size of the evaluation noise, in both directions: no measurable gain,
hence off by default; it does let more convs run in int8 at the same accuracy.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError
from .head import activation_after, regression_convs
from .qdq import QMAX, ConvQuantParams, _quantize_weight
from .qdq.placement import input_grid
from .stats import snr_db

log = logging.getLogger("yoloquant")

# 8-bit convs with a sensibly used range measure 25-40 dB here (YOLOX-nano pointwise convs
# 22.6-40, YOLOv5n 26-44); the layers that broke YOLOX-nano were at -2 to 24 dB.
MIN_LAYER_SNR_DB = 25.0
SNR_IMAGES = 16  # calibration images the SNR and bias correction are measured on
DEAD_CHANNEL = 1e-6  # a channel whose variance is below this fraction of the mean has none


@dataclass(frozen=True)
class LayerSNR:
    node_name: str
    snr_db: float  # mean over live output channels of error / variance, in dB
    worst_channel_db: float
    live_channels: int
    # per output channel, minus the mean output error of the 8-bit conv (float input): adding it
    # to the bias removes the error's systematic part (see layer_snr's ``correct_bias``)
    bias_shift: Optional[np.ndarray] = field(default=None, compare=False, repr=False)


def _probe_model(model: onnx.ModelProto, params: Sequence[ConvQuantParams],
                 input_lows: Optional[dict] = None):
    """The float graph plus, for every conv in params, a copy reading Q/DQ(input) with
    dequantized int8 weights. Returns (model, [(conv name, float output, quantized output)]).
    ``input_lows``: {tensor: measured minimum}: conv inputs on the asymmetric grid the QDQ ONNX
    deploys (``qdq.placement.input_grid``) instead of Paddle's symmetric one."""
    probe = copy.deepcopy(model)
    graph = probe.graph
    by_name = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | set(inits) | \
        {i.name for i in graph.input}
    new_nodes, new_inits, pairs, shared = [], [], [], {}

    def fresh(base):
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    for p in params:
        conv = by_name.get(p.node_name)
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            raise ModelError(f"layer_snr: {p.node_name!r} is not a Conv with a constant weight")
        x = conv.input[0]
        scale, zp = np.float32(p.input_threshold / QMAX), 128
        if input_lows is not None:
            scale, zp = input_grid(p.input_threshold, input_lows.get(x))
        key = (x, float(scale), zp)
        if key not in shared:  # one Q/DQ per (tensor, grid), as the placement writes them
            s, z = fresh(f"{x}_snr_scale"), fresh(f"{x}_snr_zp")
            q, dq = fresh(f"{x}_snr_q"), fresh(f"{x}_snr_dq")
            new_inits += [numpy_helper.from_array(np.array(scale), s),
                          numpy_helper.from_array(np.array(zp, np.uint8), z)]
            new_nodes += [helper.make_node("QuantizeLinear", [x, s, z], [q]),
                          helper.make_node("DequantizeLinear", [q, s, z], [dq])]
            shared[key] = dq
        w = numpy_helper.to_array(inits[conv.input[1]])
        q_w, s_w, per_channel = _quantize_weight(w, p)
        s_w = np.asarray(s_w, np.float32).reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else s_w
        wq = fresh(f"{conv.input[1]}_snr_w")
        new_inits.append(numpy_helper.from_array((q_w.astype(np.float32) * s_w).astype(np.float32), wq))
        twin = copy.deepcopy(conv)
        twin.name = fresh(f"{conv.name}_snr")
        twin.input[0], twin.input[1] = shared[key], wq
        del twin.output[:]
        y_q = fresh(f"{conv.output[0]}_snr_out")
        twin.output.append(y_q)
        new_nodes.append(twin)
        pairs.append((conv.name, conv.output[0], y_q))
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    existing = {o.name for o in graph.output}
    for _, y, y_q in pairs:
        for t in (y, y_q):
            if t not in existing:
                graph.output.append(onnx.ValueInfoProto(name=t))
                existing.add(t)
    return probe, pairs


def _session_without_rewrites(probe: onnx.ModelProto):
    """CPU session with no graph rewrites: ORT would otherwise fold our Q/DQ into int8 kernels
    with their own rounding."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several private exception types for bad models
        raise ModelError(f"layer_snr: ONNX Runtime cannot load the probe model: {exc}") from exc


def layer_snr(model: onnx.ModelProto, params: Sequence[ConvQuantParams], images: Sequence[np.ndarray],
              input_name: str, correct_bias: bool = False,
              input_lows: Optional[dict] = None) -> dict[str, LayerSNR]:
    """8-bit SNR of each conv in ``params`` on ``images`` (CHW float arrays); see the module doc.

    ``correct_bias``: the SNR is that of the conv with its bias corrected, i.e. with each output
    channel's mean error removed (``LayerSNR.bias_shift`` is that correction, always returned).
    Why: rounding weights to nearest and clipping the input shift each channel's output by a
    roughly constant amount (the inputs after SiLU are mostly positive, so weight rounding
    errors do not average out); a bias can absorb that part exactly.
    ``input_lows``: simulate the asymmetric input grids of the uint8 QDQ ONNX (see _probe_model)."""
    if not params:
        return {}
    if not len(images):
        raise ModelError("layer_snr needs at least one image")
    probe, pairs = _probe_model(model, params, input_lows)
    session = _session_without_rewrites(probe)
    names = [t for _, y, y_q in pairs for t in (y, y_q)]
    sums: dict[str, list] = {}
    for img in images:
        values = dict(zip(names, session.run(names, {input_name: np.asarray(img, np.float32)[None]})))
        for conv, y, y_q in pairs:
            f = values[y].astype(np.float64)
            e = values[y_q].astype(np.float64) - f
            axes = (0,) + tuple(range(2, f.ndim))
            acc = sums.setdefault(conv, [0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += f.size // f.shape[1]
            acc[1] = acc[1] + f.sum(axis=axes)
            acc[2] = acc[2] + (f * f).sum(axis=axes)
            acc[3] = acc[3] + (e * e).sum(axis=axes)
            acc[4] = acc[4] + e.sum(axis=axes)
    result = {}
    for conv, (n, s1, s2, se, s_e) in sums.items():
        var = np.maximum(s2 / n - (s1 / n) ** 2, 0.0)
        mean_error = s_e / n
        # E[(e - mean)^2] = E[e^2] - mean^2: the error left once the bias absorbs its mean
        mse = np.maximum(se / n - mean_error ** 2, 0.0) if correct_bias else se / n
        shift = (-mean_error).astype(np.float32)
        live = var > DEAD_CHANNEL * max(var.mean(), 1e-30)
        if not live.any():  # a conv with constant output: nothing to lose
            result[conv] = LayerSNR(conv, float("inf"), float("inf"), 0, shift)
            continue
        nsr = mse[live] / var[live]
        result[conv] = LayerSNR(conv, snr_db(nsr.mean()), snr_db(nsr.max()), int(live.sum()), shift)
    return result


def choose_float_convs(model: onnx.ModelProto, params: Sequence[ConvQuantParams],
                       images: Sequence[np.ndarray], input_name: str,
                       min_snr_db: Optional[float] = MIN_LAYER_SNR_DB,
                       keep_regression: bool = True,
                       correct_bias: bool = False,
                       input_lows: Optional[dict] = None) -> tuple[dict[str, str], dict[str, LayerSNR]]:
    """({conv name: why it stays float}, {conv name: LayerSNR}) for the convs in ``params``.

    ``min_snr_db`` None: nothing stays float for its SNR (the SNR is still measured, and
    returned, when ``correct_bias`` needs the bias shifts); ``keep_regression`` False:
    regression prediction convs are treated like any other conv; ``correct_bias``: SNRs are
    those after bias correction (see ``layer_snr``); ``input_lows``: judge on the QDQ ONNX's
    asymmetric input grids (``layer_snr``)."""
    names = {p.node_name for p in params}
    reasons = {c: "regression prediction conv: its output is decoded without a squashing op "
                  "(box offsets/sizes scaled by the stride)"
               for c in sorted(regression_convs(model) & names)} if keep_regression else {}
    if min_snr_db is None and not correct_bias:
        return reasons, {}
    snr = layer_snr(model, [p for p in params if p.node_name not in reasons], images, input_name,
                    correct_bias, input_lows)
    for name, s in snr.items():
        if min_snr_db is not None and s.snr_db < min_snr_db:
            reasons[name] = (f"8-bit SNR {s.snr_db:.1f} dB < {min_snr_db:g} dB (worst channel "
                             f"{s.worst_channel_db:.1f} dB): per-tensor input range too coarse for "
                             "some of its channels")
    if reasons:
        log.info("keeping %d of %d convs float: %s", len(reasons), len(names),
                 "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:6])
                 + (" ..." if len(reasons) > 6 else ""))
    return reasons, snr


def apply_float_budget(reasons: dict[str, str], snr: dict[str, LayerSNR], max_float: int,
                       ) -> tuple[dict[str, str], dict[str, str]]:
    """Hold the float convs to ``max_float``: the ones kept float for a structural reason
    (regression convs) first, then the lowest SNRs. Returns (float reasons kept, {conv: why it
    runs int8 although its SNR is under the threshold}) for the convs over the budget."""
    by_snr = sorted((n for n in reasons if n in snr), key=lambda n: snr[n].snr_db)
    fixed = [n for n in reasons if n not in snr]
    room = max(0, max_float - len(fixed))
    kept = {n: reasons[n] for n in fixed + by_snr[:room]}
    over = {n: f"{reasons[n]}; runs int8: over the float budget of {max_float} convs "
               "(max_float_conv_fraction), lower SNRs took the float places"
            for n in by_snr[room:]}
    if over:
        log.info("float budget (max_float_conv_fraction): %d convs float; %d more under the SNR "
                 "threshold run int8 anyway, the highest SNRs of them", len(kept), len(over))
    return kept, over


def silu_clip(low: float, high: float, levels: int = 255) -> float:
    """Lower end of an 8-bit grid for a conv output that only a SiLU reads.

    SiLU maps every x below -1.28 into (-0.28, 0), so the grid need not reach the conv's most
    negative value: clipping at -L costs at most |silu(-L)|. The smallest L with
    |silu(-L)| <= step / 2 (step = (high + L) / levels) keeps that below the rounding error."""
    for L in np.arange(1.3, 40.0, 0.05):
        if L / (1.0 + np.exp(L)) <= (high + L) / levels / 2:
            return float(max(low, -L))
    return float(low)


def sigmoid_clip(low: float, high: float, levels: int = 255) -> float:
    """Lower end of an 8-bit grid for a conv output that only a Sigmoid reads (score logits).

    Below -L the sigmoid is under e^-L, so clipping there costs at most that; the smallest L with
    sigmoid(-L) <= step / 8 keeps it below the largest rounding error of the sigmoid (its slope
    is at most 1/4: step / 2 * 1/4). On yolov5n's prediction convs (logits from -15..-22 up to
    7..9) that is L ~ 5: a step of 0.05 instead of 0.12 for the full range."""
    for L in np.arange(1.0, 40.0, 0.05):
        if 1.0 / (1.0 + np.exp(L)) <= (high + L) / levels / 8:
            return float(max(low, -L))
    return float(low)


def output_grid(model: onnx.ModelProto, conv_name: str, low: float, high: float) -> dict:
    """ConvQuantParams fields (``output_threshold`` or ``output_range``) for a conv whose raw
    output spans [low, high] on the calibration images: asymmetric for SiLU / ReLU / Sigmoid
    readers, whose negative side hardly matters (ReLU: not at all), symmetric otherwise."""
    act = activation_after(model, conv_name)
    if high > 0 and act == "Sigmoid":
        return {"output_range": (min(sigmoid_clip(low, high), 0.0), float(high))}
    if high > 0 and act == "Relu":
        return {"output_range": (0.0, float(high))}
    if high > 0 and act == "SiLU":
        return {"output_range": (min(silu_clip(low, high), 0.0), float(high))}
    return {"output_threshold": max(abs(low), abs(high), 1e-8)}
