"""Cross-layer equalization (Nagel et al. 2019) with measured acceptance.

Why: activations are quantized per tensor, and in depthwise / SE nets (YOLOv6-Lite, YOLOX) the
tensor a conv reads has channels whose ranges differ by 100x or more, so one 8-bit grid rounds
the small channels to nothing. Rescaling channel i by 1/s_i in the conv that writes it and by
s_i in the convs that read it moves the range into the weights, which are quantized per output
channel. The scales come from the calibration images' per-channel abs-max ``a_i`` of the middle
tensor (data-aware: with per-channel weights, the weights are not what limits these layers):

* second convs all depthwise: s_i = a_i (a depthwise weight channel has its own scale, so
  folding any s_i into it costs nothing): every channel ends with the same range;
* otherwise: s_i = sqrt(a_i / r_i), r_i the abs-max of input channel i in the second convs'
  weights (Nagel's balance, with the activation range in place of the first weight's): the
  second conv's per-output-channel weight grid must then carry s_i.

s is normalised so that the tensor's largest range is unchanged; channels under RANGE_FLOOR of
it (dead ones) are treated as at the floor, so no weight is multiplied by more than 1/floor.

Acceptance: every pair's second convs are measured in 8 bits (abs-max thresholds) against the
ORIGINAL float model, with and without the rewrite; a pair whose measured SNR does not improve
is not applied. Exact pairs (identity, ReLU) are then checked: the model with only them applied
must give the original's head outputs within EXACT_TOLERANCE of their range. Approximate pairs
(SiLU, HardSwish) try full and half strength (s ** 0.5), and each approximate class is kept
only if the fully 8-bit model's head-output SNR against the original float is better with it
and the float model stays within APPROX_MIN_FLOAT_SNR_DB of the original. The scales may even
out the middle tensor, the first conv's raw output (ONNX Runtime requantizes it) or a mix
(_bases): each pair keeps the form that measured best.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..config import EQUALIZATIONS  # noqa: F401 - re-exported
from ..errors import ModelError
from .graph import Pair, find_pairs, pair_subgraph
from .measure import (absmax_params, channel_absmax, head_outputs, head_snr_db, layer_error_db,
                      max_relative_diff)

log = logging.getLogger("yoloquant")

# EQUALIZATIONS (config.py): cle: rescaling only (exact for identity / ReLU, approximate for
# SiLU / HardSwish); cle_gate: SiLU / HardSwish pairs may instead get a per-channel Mul by s in
# front of their gate (x/s * gate(s * x/s) = act(x)/s: exact, one elementwise op more per pair)
RANGE_FLOOR = 1e-4
# ONNX Runtime's float32 convs reorder sums when weights change, so exact rewrites differ from
# the original by float rounding: measured 1e-6..1e-5 of the output range on YOLOv6-Lite
EXACT_TOLERANCE = 1e-4
APPROX_STRENGTHS = (1.0, 0.5)
# an approximate class may move the float model only this far (head-output SNR vs the original):
# the deployed int8 models, with their float fallback, are 26-29 dB from float on YOLOv6-Lite
# (with every conv 8-bit: 15 dB, a yardstick that let a 24 dB HardSwish approximation through)
APPROX_MIN_FLOAT_SNR_DB = 35.0
MIN_GAIN_DB = 0.1  # an SNR gain below this is measurement noise, not worth the rewrite
# a class of pairs is rejected when the all-8-bit head SNR falls by more than this: YOLOv6-Lite-M
# 640's 75 exact pairs were dropped for 18.20 vs 18.29 dB (8 images), a difference within the
# spread of that measurement between image draws
CLASS_GUARD_TOLERANCE_DB = 0.5


@dataclass
class PairOutcome:
    pair: Pair
    applied: bool
    reason: str = ""
    strength: float = 1.0
    spread_before: float = 1.0  # max / min per-channel abs-max of the middle tensor (live channels)
    spread_after: float = 1.0
    snr_before_db: dict = field(default_factory=dict)  # second conv -> 8-bit SNR vs float
    snr_after_db: dict = field(default_factory=dict)
    scales: np.ndarray = field(default=None, repr=False)
    gate: bool = False  # SiLU / HardSwish made exact by a Mul in front of the gate
    basis: str = "middle"  # which per-channel ranges the scales even out (_bases)

    @property
    def exact(self) -> bool:
        return self.pair.exact or self.gate

    def as_dict(self) -> dict:
        d = dict(self.pair.as_dict(), applied=self.applied, exact=self.exact,
                 range_spread_before=round(self.spread_before, 2),
                 range_spread_after=round(self.spread_after, 2),
                 snr_before_db={k: round(v, 2) for k, v in self.snr_before_db.items()},
                 snr_after_db={k: round(v, 2) for k, v in self.snr_after_db.items()})
        d["ranges_evened"] = self.basis
        if not self.pair.exact:
            d["form"] = "gate" if self.gate else f"rescale (strength {self.strength})"
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class EqualizationResult:
    model: onnx.ModelProto  # the equalized model (the input itself when nothing applied)
    mode: str
    outcomes: list = field(default_factory=list)
    not_paired: dict = field(default_factory=dict)  # conv -> why its output is in no pair
    message: str = ""
    exact_max_rel_diff: float = 0.0
    float_head_snr_db: float = 300.0  # equalized float vs original float
    int8_head_snr_db: dict = field(default_factory=dict)  # every conv 8-bit, vs original float
    class_rejections: dict = field(default_factory=dict)

    @property
    def applied(self) -> list:
        return [o for o in self.outcomes if o.applied]

    def why_float(self, conv: str) -> str:
        """Why equalization did not bring `conv` (a conv kept float) into 8 bits."""
        for o in self.outcomes:
            if conv in o.pair.seconds:
                if o.applied:
                    return (f"its input was equalized ({o.pair.activation} pair from {o.pair.first}, "
                            f"range spread {o.spread_before:.0f}x -> {o.spread_after:.1f}x); "
                            "its 8-bit SNR is still below the threshold")
                return f"its input's pair (from {o.pair.first}) was rejected: {o.reason}"
        if self.mode == "none":
            return "equalization off (equalization: none)"
        return ("its input is not an equalizable pair's middle tensor (not written by a lone conv "
                "+ activation read only by convs, directly or through pooling / ReLU / a Mul by an "
                "unscaled tensor)")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "message": self.message,
                "pairs_found": len(self.outcomes), "pairs_equalized": len(self.applied),
                "exact_check_max_rel_diff": self.exact_max_rel_diff,
                "float_head_snr_db_vs_original": round(self.float_head_snr_db, 2),
                "int8_head_snr_db_vs_original": {k: round(v, 2) for k, v in self.int8_head_snr_db.items()},
                "classes_rejected": self.class_rejections,  # "exact" or an activation kind -> why
                "pairs": [o.as_dict() for o in self.outcomes],
                "convs_not_first_of_a_pair": dict(sorted(self.not_paired.items()))}


# ---- scales and the rewrite ---------------------------------------------------------------
def _spread(a: np.ndarray) -> float:
    live = a[a > RANGE_FLOOR * a.max()] if a.max() > 0 else a[:1]
    return float(live.max() / live.min()) if live.size and live.min() > 0 else 1.0


def _conv(model: onnx.ModelProto):
    by_name = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    return by_name, inits


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _input_channel_ranges(model: onnx.ModelProto, pair: Pair) -> tuple[np.ndarray, bool]:
    """(abs-max per input channel over the second convs' weights, each conv normalised by its
    own max; all depthwise?)."""
    by_name, inits = _conv(model)
    ranges, depthwise = [], True
    for name in pair.seconds:
        node = by_name[name]
        w = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
        g = _group(node)
        cpg = w.shape[1]
        if not (cpg == 1 and g > 1):
            depthwise = False
        opg = w.shape[0] // g
        per = w.reshape(g, opg, cpg, -1).max(axis=(1, 3)).reshape(-1)  # input channel order
        ranges.append(per / max(per.max(), 1e-30))
    return np.max(ranges, axis=0), depthwise


def pair_scales(model: onnx.ModelProto, pair: Pair, a: np.ndarray, strength: float) -> np.ndarray:
    """s (one per channel of the middle tensor): see the module doc."""
    a = np.maximum(a, RANGE_FLOOR * max(a.max(), 1e-30))
    r, depthwise = _input_channel_ranges(model, pair)
    r = np.maximum(r, RANGE_FLOOR)
    s = a if depthwise else np.sqrt(a / r)
    s = s ** strength
    return s * (a / s).max() / a.max() if a.max() > 0 else np.ones_like(a)


def apply_scales(model: onnx.ModelProto, chosen: dict, gated=()) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with every pair in `chosen` ({Pair: s}) rescaled, the SiLU / HardSwish
    pairs in `gated` with a Mul by s in front of their gate, and {first conv: s} (its outputs
    are 1/s of the original's)."""
    out = copy.deepcopy(model)
    by_name, inits = _conv(out)
    for pair in gated:
        _insert_gate_scale(out, by_name[pair.first].output[0], chosen[pair])
    for pair, s in chosen.items():
        first = by_name[pair.first]
        for k, t in enumerate(first.input[1:3]):
            if not t:
                continue
            v = numpy_helper.to_array(inits[t]).astype(np.float64)
            shape = (-1,) + (1,) * (v.ndim - 1)
            inits[t].CopyFrom(numpy_helper.from_array((v / s.reshape(shape)).astype(np.float32), t))
        for name in pair.seconds:
            node = by_name[name]
            t = node.input[1]
            w = numpy_helper.to_array(inits[t]).astype(np.float64)
            g = _group(node)
            scaled = w.reshape(g, w.shape[0] // g, w.shape[1], -1) * s.reshape(g, 1, w.shape[1], 1)
            inits[t].CopyFrom(numpy_helper.from_array(scaled.reshape(w.shape).astype(np.float32), t))
    return out, {p.first: s for p, s in chosen.items()}


def _insert_gate_scale(model: onnx.ModelProto, x: str, s: np.ndarray) -> None:
    from onnx import helper

    graph = model.graph
    k, gate = next((k, n) for k, n in enumerate(graph.node)
                   if n.op_type in ("HardSigmoid", "Sigmoid") and n.input[0] == x)
    const, scaled = f"{x}_eq_gate_scale", f"{x}_eq_gate_in"
    graph.initializer.append(numpy_helper.from_array(s.astype(np.float32).reshape(1, -1, 1, 1), const))
    graph.node.insert(k, helper.make_node("Mul", [x, const], [scaled], name=f"{gate.name}_eq_scale"))
    gate.input[0] = scaled


def rewrite(model: onnx.ModelProto, outcomes) -> onnx.ModelProto:
    """`model` with the rewrites of `outcomes` (PairOutcome) applied."""
    return apply_scales(model, {o.pair: o.scales for o in outcomes},
                        [o.pair for o in outcomes if o.gate])[0]


# ---- the decision ---------------------------------------------------------------------------
def _mean_db(snr: dict, convs=None) -> float:
    """Mean SNR of `convs` (default: every conv in `snr`)."""
    return float(np.mean([snr[c] for c in (snr if convs is None else convs)]))


def _pair_inputs(model, pairs, images, input_name) -> dict:
    """{Pair: [its subgraph's feed on each image]} from one run of the original model."""
    from ..runtime import session_with_outputs

    by_name = {n.name: n for n in model.graph.node}
    wanted = {p: (by_name[p.first].input[0],) + p.side for p in pairs}
    names = list(dict.fromkeys(t for ts in wanted.values() for t in ts))
    session = session_with_outputs(model, names)
    found = {p: [] for p in pairs}
    for img in images:
        values = dict(zip(names, session.run(names, {input_name: np.asarray(img, np.float32)[None]})))
        for p, ts in wanted.items():
            found[p].append({t: values[t] for t in ts})
    return found


def _with_output_grid(sub: onnx.ModelProto, pair: Pair, inputs, x_name: str) -> onnx.ModelProto:
    """`sub` with the first conv's raw output through a symmetric 8-bit Q/DQ (abs-max on the
    inputs), as ONNX Runtime's layout requantizes every int8 conv's output. Not for ReLU: its
    grid starts at 0 (precision.output_grid), so the negative side it clips costs nothing."""
    from onnx import helper

    if pair.activation == "relu":
        return sub
    out = copy.deepcopy(sub)
    first = next(n for n in out.graph.node if n.name == pair.first)
    t = first.output[0]
    top = float(channel_absmax(sub, [t], inputs, x_name)[t].max())
    raw, q, sc, zp = f"{t}_eqraw", f"{t}_eqq", f"{t}_eqs", f"{t}_eqz"
    first.output[0] = raw
    out.graph.initializer.extend([numpy_helper.from_array(np.array(max(top, 1e-8) / 127, np.float32), sc),
                                  numpy_helper.from_array(np.array(0, np.int8), zp)])
    k = list(out.graph.node).index(first) + 1
    out.graph.node.insert(k, helper.make_node("DequantizeLinear", [q, sc, zp], [t]))
    out.graph.node.insert(k, helper.make_node("QuantizeLinear", [raw, sc, zp], [q]))
    return out


def _bases(post: np.ndarray, pre: np.ndarray) -> dict:
    """Per-channel ranges the scales may equalize: the middle tensor's (what the second convs
    read), the first conv's raw output's too (what ONNX Runtime requantizes: for HardSwish / SiLU
    its negative tail can be far wider than the activation's output), and their geometric mean."""
    both = np.maximum(post, pre)
    found = {"middle": post}
    if not np.allclose(both, post):
        found.update(raw=both, mean=np.sqrt(post * both))
    return found


def _judge(model, pair, post, pre, inputs, allow_gate: bool, output_grid: bool,
           per_channel: bool = True) -> PairOutcome:
    """Measure the pair alone (graph.pair_subgraph, on the original model's values of its input):
    8-bit SNR of its second convs against the original float (with output_grid, the first
    conv's output requantized too), as is and equalized in each form; keep the best, or reject
    when none gains MIN_GAIN_DB. With per-tensor weights the first conv is judged too: scaling
    its output channels changes its own weight grid, which per-channel weights are immune to."""
    sub = pair_subgraph(model, pair)
    x_name = sub.graph.input[0].name
    judged = list(pair.seconds) if per_channel else [pair.first, *pair.seconds]

    def measured(m, out_scale=None):
        snr = layer_error_db(sub, _with_output_grid(m, pair, inputs, x_name) if output_grid else m,
                             pair.seconds, {}, inputs, x_name, per_channel)
        if not per_channel:  # its weight error, in the original's units (its output grid is in the seconds')
            snr.update(layer_error_db(sub, m, [pair.first], out_scale or {}, inputs, x_name, False))
        return snr

    before = measured(sub)
    forms = [(1.0, False)] if pair.exact else [(st, False) for st in APPROX_STRENGTHS]
    if allow_gate and not pair.exact:
        forms.append((1.0, True))
    best = None
    for basis, a in _bases(post, pre).items():
        for strength, gate in forms:
            s = pair_scales(model, pair, a, strength)
            snr = measured(*apply_scales(sub, {pair: s}, [pair] if gate else []))
            if best is None or _mean_db(snr, judged) > _mean_db(best[3], judged):
                best = (strength, gate, s, snr, basis)
    strength, gate, s, snr, basis = best
    o = PairOutcome(pair, True, strength=strength, gate=gate, spread_before=_spread(post), scales=s,
                    snr_before_db={c: before[c] for c in judged},
                    snr_after_db={c: snr[c] for c in judged}, basis=basis)
    if _mean_db(snr, judged) < _mean_db(before, judged) + MIN_GAIN_DB:
        o.applied = False
        o.reason = (f"8-bit SNR of its {'second ' if per_channel else ''}conv(s) {_mean_db(snr, judged):.1f} "
                    f"dB equalized vs {_mean_db(before, judged):.1f} dB as is: no gain")
    return o


def _choose(model, pairs, images, input_name, allow_gate, output_grid, per_channel) -> list[PairOutcome]:
    by_name = {n.name: n for n in model.graph.node}
    pre_of = {p: by_name[p.first].output[0] for p in pairs}
    ranges = channel_absmax(model, [p.middle for p in pairs] + list(pre_of.values()), images, input_name)
    inputs = _pair_inputs(model, pairs, images, input_name)
    return [_judge(model, p, ranges[p.middle], ranges[pre_of[p]], inputs[p], allow_gate, output_grid,
                   per_channel) for p in pairs]


def _int8_head_snr(model, reference_out, images, input_name, per_channel: bool = True) -> float:
    """Head-output SNR, against the original float, of `model` with every conv in 8 bits."""
    from ..qdq import insert_qdq

    convs = [n.name for n in model.graph.node if n.op_type == "Conv"
             and all(t in {i.name for i in model.graph.initializer} for t in n.input[1:2])]
    qdq = insert_qdq(model, absmax_params(model, convs, images, input_name, per_channel))
    return head_snr_db(reference_out, head_outputs(qdq, images, input_name))


def _check_exact(model, outcomes, reference_out, images, input_name) -> float:
    exact = [o for o in outcomes if o.applied and o.exact]
    if not exact:
        return 0.0
    diff = max_relative_diff(reference_out, head_outputs(rewrite(model, exact), images, input_name))
    if diff > EXACT_TOLERANCE:
        raise ModelError(f"equalization: the exact rewrite of {len(exact)} pairs "
                         f"changed the float model's output by {diff:.3g} of its range (> "
                         f"{EXACT_TOLERANCE:g}); set equalization: none and report this model")
    return diff


def _guard_classes(model, outcomes, reference_out, images, input_name,
                   per_channel: bool = True) -> tuple[dict, dict]:
    """Drop each class of pairs (the exact ones, then each approximate activation kind) whose
    pairs make the all-8-bit head output further from the original float. Each pair was judged
    alone; this catches what only shows together (with per-tensor weights, the rescaled first
    convs' weight grids). Returns ({variant: int8 head SNR}, {class: why rejected})."""
    def applied_model(keep):
        return rewrite(model, [o for o in outcomes if o.applied and keep(o)])

    def reject(kind, why, members):
        rejected[kind] = why
        for o in outcomes:
            if o.applied and members(o):
                o.applied, o.reason = False, f"{kind} pairs rejected as a class: {why}"

    snr = {"original": _int8_head_snr(model, reference_out, images, input_name, per_channel)}
    base_key, rejected = "original", {}
    if any(o.applied and o.exact for o in outcomes):
        snr["exact_pairs"] = _int8_head_snr(applied_model(lambda o: o.exact), reference_out,
                                            images, input_name, per_channel)
        if snr["exact_pairs"] < snr["original"] - CLASS_GUARD_TOLERANCE_DB:
            reject("exact", f"8-bit head-output SNR {snr['exact_pairs']:.2f} dB with the exact pairs vs "
                   f"{snr['original']:.2f} dB without", lambda o: o.exact)
        else:
            base_key = "exact_pairs"
    for kind in sorted({o.pair.activation for o in outcomes if o.applied and not o.exact}):
        key = f"exact_pairs+{kind}" if base_key != "original" else kind
        with_kind = applied_model(lambda o: o.exact or o.pair.activation == kind)
        snr[key] = _int8_head_snr(with_kind, reference_out, images, input_name, per_channel)
        float_db = head_snr_db(reference_out, head_outputs(with_kind, images, input_name))
        members = lambda o, kind=kind: not o.exact and o.pair.activation == kind  # noqa: E731
        if snr[key] < snr[base_key] - CLASS_GUARD_TOLERANCE_DB:
            reject(kind, f"8-bit head-output SNR {snr[key]:.2f} dB with the {kind} pairs vs "
                   f"{snr[base_key]:.2f} dB without", members)
        elif float_db < APPROX_MIN_FLOAT_SNR_DB:
            reject(kind, f"the float model with the {kind} pairs rescaled is {float_db:.1f} dB "
                   f"SNR from the original (< {APPROX_MIN_FLOAT_SNR_DB:g} dB)", members)
    return snr, rejected


def equalize(model: onnx.ModelProto, images: Sequence[np.ndarray], input_name: str,
             mode: str = "cle", output_grid: bool = True, per_channel_weights: bool = True) -> EqualizationResult:
    """Equalize `model` (not modified) on `images` (CHW float arrays); see the module doc.
    `output_grid`: the deployed runtime requantizes conv outputs (ONNX Runtime's layout), so
    each pair is judged with its first conv's output in 8 bits too. `per_channel_weights`:
    false when the deployed weights have one scale per tensor (`weight_quantize_type: abs_max`),
    so every measurement simulates that."""
    pairs, not_paired = find_pairs(model)
    result = EqualizationResult(model, mode, not_paired=not_paired)
    if mode == "none":
        result.message = "equalization: none (model unchanged)"
        return result
    if not pairs:
        result.message = "no equalizable conv pair in this model: nothing changed"
        log.info("equalization: %s", result.message)
        return result
    result.outcomes = _choose(model, pairs, images, input_name, mode == "cle_gate", output_grid,
                              per_channel_weights)
    reference_out = head_outputs(model, images, input_name)
    result.exact_max_rel_diff = _check_exact(model, result.outcomes, reference_out, images, input_name)
    result.int8_head_snr_db, result.class_rejections = _guard_classes(
        model, result.outcomes, reference_out, images, input_name, per_channel_weights)
    _finish(model, result, reference_out, images, input_name)
    return result


def _finish(model, result: EqualizationResult, reference_out, images, input_name) -> None:
    applied = result.applied
    if not applied:
        result.message = (f"{len(result.outcomes)} conv pairs found, none applied (no measured 8-bit "
                          "SNR gain, or its class rejected): nothing changed")
        log.info("equalization: %s", result.message)
        return
    result.model = rewrite(model, applied)
    after = channel_absmax(result.model, [o.pair.middle for o in applied], images, input_name)
    for o in result.applied:
        o.spread_after = _spread(after[o.pair.middle])
    result.float_head_snr_db = head_snr_db(reference_out, head_outputs(result.model, images, input_name))
    exact = sum(o.exact for o in applied)
    result.message = (f"equalized {len(applied)} of {len(result.outcomes)} conv pairs ({exact} exact, "
                      f"{len(applied) - exact} approximate); float head output vs original "
                      f"{result.float_head_snr_db:.1f} dB SNR; middle-tensor range spread median "
                      f"{np.median([o.spread_before for o in result.applied]):.0f}x -> "
                      f"{np.median([o.spread_after for o in result.applied]):.1f}x")
    log.info("equalization: %s", result.message)
    for o in result.outcomes:
        log.info("  %s %s -> %s: %s", "equalized" if o.applied else "rejected ", o.pair.activation,
                 o.pair.first, f"spread {o.spread_before:.0f}x -> {o.spread_after:.1f}x, SNR "
                 f"{_mean_db(o.snr_before_db):.1f} -> {_mean_db(o.snr_after_db):.1f} dB"
                 if o.applied else o.reason)
