"""Learned weight rounding (AdaRound / BRECQ / QDrop) on the ONNX graph, exportable as QDQ.

Why not paddleslim's ``quant_recon_static``: see /work/shared/STACK.md (weights quantized twice
with onnx_format, no regions on X2Paddle graphs, drop_prob ignored, the whole network re-run per
layer). Here everything works on the original ONNX graph, the graph the QDQ file is written into:

* **Units.** Layer-wise: one quantized Conv plus its SiLU (Sigmoid*Mul) when the conv output
  feeds only that (AdaRound reconstructs the activation output). Region-wise: single-entry
  single-exit subgraphs found from the graph structure (`recon_units.find_regions`), holding at most `limit`
  Convs (BRECQ's blocks, e.g. a bottleneck with its residual Add, a whole small C3).
* **Data, cached once.** One ONNX Runtime pass over the calibration images fetches every unit's
  input tensor and keeps a few random spatial crops per image (not whole maps: memory and speed).
  By default the input is the float network's (``recon_input: float``): every unit is then
  independent, no re-running per layer. ``recon_input: quantized`` gives each unit the input of
  the deployed QDQ model with the rounding learned so far (the papers' "quantized-so-far"
  input: the units before it already reconstructed), so each unit also learns to absorb the
  error of the layers before it; one pass of the QDQ model over the calibration images per
  unit. The target is the float unit applied to the float crop. Taking every input from the
  round-to-nearest PTQ model instead (what this did before) double-counts that correction: each
  unit compensates an error its reconstructed predecessors no longer make (yolov5n, per-tensor
  weights, KL: mAP 0.29 -> 0.04).
* **Crops are exact where it matters.** A unit's output near a crop border depends on pixels
  outside the crop; the loss ignores a margin (receptive-field radius) on every side that is not
  the image border, where zero padding is what the network does anyway.
* **Optimisation** (Paddle dynamic mode): W_soft = s * clip(floor(W/s) + h(V), -127, 127) with
  the rectified sigmoid h; loss = masked MSE (sum over channels, mean over pixels) + lambda *
  sum(1 - |2h - 1|^beta), beta annealed from beta[0] to beta[1] after a warm-up without the
  regulariser (AdaRound). With simulate_activation_quant every quantized conv input is
  fake-quantized with its calibrated threshold (straight-through gradient); QDrop keeps each
  element float with probability drop_prob. Hard rounding at the end: floor + (V >= 0), so each
  int8 weight is floor or ceil of w/s: within one step of round-to-nearest.
* **Learned activation steps** (``recon_act_scale: learned``, with simulate_activation_quant):
  each quantized conv's input threshold T is also learned, as LSQ does (Esser et al. 2020; the
  BRECQ and QDrop papers learn their activation steps the same way): T = T_calibrated * r, the
  gradient reaching r through the rounding (straight-through) and the clipping. One threshold
  per tensor, as both artifacts deploy it: the first unit reading a tensor learns it, later
  readers use the learned value fixed. The image input keeps its calibrated grid (the ORT layout
  replaces it with the exact 1/255 grid anyway).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from .errors import ConfigError, ModelError
from .recon_units import Unit, build_units, graph_constants
from .runtime import session_with_outputs

log = logging.getLogger("yoloquant")

RECON_LEVELS = ("layer-wise", "region-wise")
INPUT_SOURCES = ("float", "quantized")
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
WQMAX = 127  # weight grid of qdq.insert_qdq: clip(round(w / s), -127, 127)
ACT_QMIN, ACT_QMAX = -128, 127  # uint8 with zero point 128 = symmetric int8 grid plus -128
ACT_SCALES = ("calibrated", "learned")
# Adam moves the threshold ratio r by about this much per step: over a unit's ~200 steps r can
# travel +-0.2 at most, i.e. the learned grid stays near the calibrated one it refines
ACT_SCALE_LR = 1e-3
ACT_RATIO_MIN = 0.05  # the threshold never collapses to 0 (a zero step divides by zero)


# ---- settings -------------------------------------------------------------------------------
@dataclass
class ReconSettings:
    recon_level: str = "layer-wise"
    simulate_activation_quant: bool = False
    epochs: int = 25  # passes over the cached crops per unit
    lr: float = 0.01
    limit: int = 6  # max convs per region
    drop_prob: float = 0.5  # QDrop; only with simulate_activation_quant
    images: Optional[int] = None  # calibration images used (null: all)
    lam: float = 0.01
    beta: tuple = (20.0, 2.0)
    warmup: float = 0.2
    input_source: str = "float"
    # Crop layout: ~2048 exact output pixels per step either way (CPU time is the limit). Layers
    # have a margin of a pixel or two, so many small crops; regions have margins of 2-5 pixels,
    # so fewer, larger crops waste less. None: the level's default below.
    crops_per_image: Optional[int] = None  # layer-wise 8, region-wise 2
    crop: Optional[int] = None  # exact output pixels per crop side: layer-wise 8, region-wise 16
    batch_size: Optional[int] = None  # crops per step: layer-wise 32, region-wise 8
    seed: int = 0
    regions: Optional[list] = None  # [[input, output], ...] ONNX tensor names; None: found
    act_scale: str = "calibrated"  # or learned (LSQ; needs simulate_activation_quant)

    def __post_init__(self):
        if self.recon_level not in RECON_LEVELS:
            raise ConfigError(f"recon_level must be one of {', '.join(RECON_LEVELS)}, got {self.recon_level!r}")
        if self.input_source not in INPUT_SOURCES:
            raise ConfigError(f"recon_input must be one of {', '.join(INPUT_SOURCES)}, got {self.input_source!r}")
        if self.act_scale not in ACT_SCALES:
            raise ConfigError(f"recon_act_scale must be one of {', '.join(ACT_SCALES)}, got {self.act_scale!r}")
        if self.act_scale == "learned" and not self.simulate_activation_quant:
            raise ConfigError("recon_act_scale: learned needs --simulate_activation_quant (the activation "
                              "steps are learned through the simulated activation quantization)")
        layer = self.recon_level == "layer-wise"
        self.crops_per_image = self.crops_per_image or (8 if layer else 2)
        self.crop = self.crop or (8 if layer else 16)
        self.batch_size = self.batch_size or (32 if layer else 8)
        if self.epochs < 1 or self.limit < 1 or self.crops_per_image < 1 or self.batch_size < 1 or self.crop < 1:
            raise ConfigError("epochs, limit, crops per image, crop size and batch size must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ConfigError(f"drop_prob must be in [0, 1], got {self.drop_prob}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"recon_warmup must be in [0, 1), got {self.warmup}")
        if len(self.beta) != 2 or not all(b > 0 for b in self.beta):
            raise ConfigError(f"recon_beta must be [start, end] > 0, got {self.beta}")
        if self.lam < 0:
            raise ConfigError(f"recon_lambda must be >= 0, got {self.lam}")
        if self.images is not None and self.images < 1:
            raise ConfigError(f"recon_images must be at least 1 (or null: all), got {self.images}")
        self.beta = tuple(float(b) for b in self.beta)


# ---- cached crops ---------------------------------------------------------------------------
@dataclass
class CropSet:
    """Input crops of one unit (float and, for recon_input quantized, the PTQ model's) and masks."""

    x: np.ndarray  # (N, C, h_in, w_in) input the quantized unit sees
    x_float: np.ndarray  # (N, C, h_in, w_in) float network's input (target is computed from it)
    mask: np.ndarray  # (N, 1, h_out, w_out) 1 where the crop output is exact


def _crop_geometry(unit: Unit, crop: int):
    _, h_out, w_out = unit.out_shape
    size = tuple(min(crop + 2 * unit.margin[a], (h_out, w_out)[a]) for a in range(2))
    return size, tuple(size[a] * unit.stride[a] for a in range(2))


def _crop_positions(unit: Unit, crop: int, count: int, rng) -> list[tuple]:
    (oh, ow), _ = _crop_geometry(unit, crop)
    _, h_out, w_out = unit.out_shape
    return [(int(rng.integers(0, h_out - oh + 1)), int(rng.integers(0, w_out - ow + 1))) for _ in range(count)]


def _mask(unit: Unit, crop: int, pos: tuple) -> np.ndarray:
    (oh, ow), _ = _crop_geometry(unit, crop)
    _, h_out, w_out = unit.out_shape
    m = np.zeros((oh, ow), dtype=np.float32)
    mh, mw = unit.margin
    top = 0 if pos[0] == 0 else mh
    bottom = oh if pos[0] + oh == h_out else oh - mh
    left = 0 if pos[1] == 0 else mw
    right = ow if pos[1] + ow == w_out else ow - mw
    m[top:max(top, bottom), left:max(left, right)] = 1.0
    return m


def crop_positions(units: list[Unit], n_images: int, settings: ReconSettings) -> list:
    """Per unit, per image, the crops' top-left output pixels (the same for every input source)."""
    rng = np.random.default_rng(settings.seed)
    return [[_crop_positions(u, settings.crop, settings.crops_per_image, rng) for _ in range(n_images)]
            for u in units]


def _crops_of(model: onnx.ModelProto, units: list[Unit], positions: list, images, input_name: str,
              settings: ReconSettings, desc: Optional[str] = None, progress: bool = False) -> list:
    """One ONNX Runtime pass of `model` over the images; per unit, its input's crops (N, C, h, w)."""
    from .progress import progress as progress_of

    wanted = sorted({u.input for u in units if u.input != input_name})
    sess = session_with_outputs(model, wanted)
    xs = [[] for _ in units]
    for i, img in enumerate(progress_of(images, desc=desc or "caching unit inputs", unit="img",
                                        enabled=progress)):
        values = dict(zip(wanted, sess.run(wanted, {input_name: img[None]}))) if wanted else {}
        values[input_name] = img[None]
        for u, unit in enumerate(units):
            t = values[unit.input][0]
            _, (ih, iw) = _crop_geometry(unit, settings.crop)
            for (py, px) in positions[u][i]:
                y0, x0 = py * unit.stride[0], px * unit.stride[1]
                xs[u].append(t[:, y0:y0 + ih, x0:x0 + iw].copy())
    return [np.stack(x).astype(np.float32) for x in xs]


def collect_crops(units: list[Unit], float_model: onnx.ModelProto, images: Sequence[np.ndarray],
                  input_name: str, settings: ReconSettings, progress: bool = True) -> list[CropSet]:
    """One ONNX Runtime pass of the float model fetching every unit's input crops."""
    positions = crop_positions(units, len(images), settings)
    xs = _crops_of(float_model, units, positions, images, input_name, settings, progress=progress)
    out = []
    for u, unit in enumerate(units):
        masks = np.stack([_mask(unit, settings.crop, p) for per_img in positions[u] for p in per_img])[:, None]
        out.append(CropSet(xs[u], xs[u], masks))
    return out


def quantized_crops(unit: Unit, model: onnx.ModelProto, images, input_name: str,
                    settings: ReconSettings, positions: list, float_crops: CropSet) -> CropSet:
    """`unit`'s crops with the input taken from `model` (the QDQ model quantized so far) at the
    float crops' positions; the float input stays the target's."""
    x = _crops_of(model, [unit], [positions], images, input_name, settings)[0]
    return CropSet(x, float_crops.x_float, float_crops.mask)


# ---- the interpreter and the learned rounding -----------------------------------------------
@dataclass
class ConvState:
    """The rounding variables of one quantized conv."""

    name: str
    w: np.ndarray  # float weight
    scale: np.ndarray  # float32 per output channel (shape (C_out,)) as insert_qdq computes it
    dead: np.ndarray  # channels with a zero threshold: quantized to 0
    floor: np.ndarray
    rtn: np.ndarray  # round-to-nearest int8 weight (what PTQ deploys)
    v: object = None  # paddle Parameter
    input_threshold: float = 1.0
    input_ratio: object = None  # paddle Parameter r (recon_act_scale: learned): threshold * r


def _conv_state(p, w: np.ndarray) -> ConvState:
    t = p.weight_thresholds
    c_out = w.shape[0]
    if t.size not in (1, c_out):
        raise ModelError(f"Conv {p.node_name!r}: {t.size} weight thresholds for {c_out} output channels")
    t = np.broadcast_to(t, (c_out,))
    dead = t <= 0
    # the same float32 scale as qdq._quantize_weight, so learned ints mean the same in the file
    scale = np.where(dead, 1.0, t / WQMAX).astype(np.float32)
    ws = w.astype(np.float64) / scale.astype(np.float64).reshape(-1, 1, 1, 1)
    rtn = np.clip(np.round(ws), -WQMAX, WQMAX)
    rtn[dead] = 0
    return ConvState(p.node_name, w.astype(np.float32), scale, dead, np.floor(ws), rtn.astype(np.int8),
                     input_threshold=float(p.input_threshold))


def _init_v(state: ConvState) -> np.ndarray:
    # h(V) = frac(w / s) at the start, so the soft weight starts at the float weight
    frac = (state.w.astype(np.float64) / state.scale.astype(np.float64).reshape(-1, 1, 1, 1)) - state.floor
    frac = np.clip(frac, 1e-4, 1 - 1e-4)
    return (-np.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).astype(np.float32)


def hard_weight(state: ConvState, v: np.ndarray) -> np.ndarray:
    """Learned int8 weight: floor(w / s) + (h(V) >= 0.5), i.e. V >= 0."""
    q = np.clip(state.floor + (v >= 0), -WQMAX, WQMAX)
    q[state.dead] = 0
    return q.astype(np.int8)


class UnitRunner:
    """Runs a unit's nodes in Paddle with float, soft-rounded or given int8 weights."""

    def __init__(self, unit: Unit, consts: dict, states: dict[str, ConvState]):
        import paddle

        self.paddle = paddle
        self.unit = unit
        self.consts = consts
        self.states = states  # quantized convs of this unit, by node name
        self.tensors = {}
        for n in unit.nodes:
            for t in n.input:
                if t in consts and t not in self.tensors:
                    self.tensors[t] = paddle.to_tensor(consts[t].astype(np.float32)
                                                       if consts[t].dtype == np.float64 else consts[t])

    def weight(self, node, mode: str, ints: Optional[dict] = None):
        """mode: float | soft | hard (uses ints[name] or the rounding variables) | rtn."""
        P = self.paddle
        st = self.states.get(node.name)
        if st is None or mode == "float":
            return self.tensors[node.input[1]]
        s = P.to_tensor(st.scale.reshape(-1, 1, 1, 1))
        if mode == "soft":
            h = P.clip(P.nn.functional.sigmoid(st.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
            q = P.clip(P.to_tensor(st.floor.astype(np.float32)) + h, -WQMAX, WQMAX)
            if st.dead.any():
                q = q * P.to_tensor((~st.dead).astype(np.float32).reshape(-1, 1, 1, 1))
            return q * s
        q = ints[node.name] if ints is not None else (st.rtn if mode == "rtn" else hard_weight(st, st.v.numpy()))
        return P.to_tensor(q.astype(np.float32)) * s

    def fake_quant(self, x, threshold: float, drop_prob: float, training: bool, ratio=None):
        P = self.paddle
        if ratio is None:
            s = threshold / 127.0
            q = P.clip(P.round(x / s), ACT_QMIN, ACT_QMAX) * s
            q = x + (q - x).detach()  # straight-through: gradient of identity
        else:  # LSQ: the step gets gradient through the rounding and the clipping
            s = P.clip(ratio, min=ACT_RATIO_MIN) * (threshold / 127.0)
            c = P.clip(x / s, ACT_QMIN, ACT_QMAX)
            q = (c + (P.round(c) - c).detach()) * s
        if training and drop_prob > 0:
            keep = (P.rand(x.shape) < drop_prob).astype(x.dtype)
            q = keep * x + (1 - keep) * q
        return q

    def __call__(self, x, mode: str, act_quant: bool = False, drop_prob: float = 0.0,
                 training: bool = False, ints: Optional[dict] = None):
        P = self.paddle
        F = P.nn.functional
        env = dict(self.tensors)
        env[self.unit.input] = x
        for n in self.unit.nodes:
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            ins = [env[t] if t else None for t in n.input]
            if n.op_type == "Conv":
                inp = ins[0]
                if act_quant and n.name in self.states:
                    st = self.states[n.name]
                    inp = self.fake_quant(inp, st.input_threshold, drop_prob, training, st.input_ratio)
                w = self.weight(n, mode, ints)
                pads = a.get("pads", [0, 0, 0, 0])
                y = F.conv2d(inp, w, bias=ins[2] if len(ins) > 2 else None, stride=a.get("strides", [1, 1]),
                             padding=[pads[0], pads[2], pads[1], pads[3]], dilation=a.get("dilations", [1, 1]),
                             groups=a.get("group", 1))
            elif n.op_type == "Sigmoid":
                y = F.sigmoid(ins[0])
            elif n.op_type == "HardSigmoid":  # ONNX defaults: alpha 0.2, beta 0.5
                y = P.clip(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0.0, 1.0)
            elif n.op_type == "HardSwish":
                y = ins[0] * P.clip(ins[0] / 6.0 + 0.5, 0.0, 1.0)
            elif n.op_type == "Mul":
                y = ins[0] * ins[1]
            elif n.op_type == "Add":
                y = ins[0] + ins[1]
            elif n.op_type == "Concat":
                y = P.concat(ins, axis=a["axis"])
            elif n.op_type == "MaxPool":
                pads = a.get("pads", [0, 0, 0, 0])
                if pads[0] != pads[2] or pads[1] != pads[3]:
                    raise ModelError(f"MaxPool {n.name}: asymmetric pads are not supported in a region")
                y = F.max_pool2d(ins[0], a["kernel_shape"], stride=a.get("strides", a["kernel_shape"]),
                                 padding=[pads[0], pads[1]], ceil_mode=bool(a.get("ceil_mode", 0)))
            elif n.op_type == "Relu":
                y = F.relu(ins[0])
            elif n.op_type == "LeakyRelu":
                y = F.leaky_relu(ins[0], a.get("alpha", 0.01))
            else:  # find_regions only admits SUPPORTED_OPS
                raise ModelError(f"internal error: op {n.op_type} in a reconstruction unit")
            env[n.output[0]] = y
        return env[self.unit.output]


def _masked_loss(P, pred, target, mask):
    # BRECQ/AdaRound loss: squared error summed over channels, averaged over (exact) pixels
    err = ((pred - target) ** 2).sum(axis=1, keepdim=True) * mask
    return err.sum() / P.clip(mask.sum(), min=1.0)


@dataclass
class UnitResult:
    name: str
    convs: list
    loss_before: float
    loss_after: float
    changed_fraction: float
    weights: int
    iterations: int
    seconds: float
    crops: int
    # recon_act_scale learned: {conv: [calibrated, learned]} input thresholds of the convs whose
    # input tensor this unit learned
    input_thresholds: dict = field(default_factory=dict)


def _evaluate(P, runner, crops: CropSet, target, act_quant: bool, mode: str, ints=None, chunk: int = 64) -> float:
    total, count = 0.0, 0.0
    with P.no_grad():
        for a in range(0, len(crops.x), chunk):
            x = P.to_tensor(crops.x[a:a + chunk])
            m = P.to_tensor(crops.mask[a:a + chunk])
            pred = runner(x, mode, act_quant=act_quant, ints=ints)
            err = ((pred - target[a:a + chunk]) ** 2).sum(axis=1, keepdim=True) * m
            total += float(err.sum())
            count += float(m.sum())
    return total / max(count, 1.0)


def reconstruct_unit(unit: Unit, crops: CropSet, states: dict[str, ConvState], consts: dict,
                     settings: ReconSettings, rng, progress=None,
                     learn_inputs: Optional[dict] = None) -> tuple[dict, UnitResult]:
    """Learns the rounding of the unit's quantized convs and the input thresholds of the convs
    in learn_inputs ({conv: its input tensor}: one threshold per tensor, shared by its readers);
    returns {conv: int8 weight} and stats. Learned thresholds are left in
    states[conv].input_threshold."""
    import paddle as P

    started = time.perf_counter()
    runner = UnitRunner(unit, consts, states)
    act_quant = settings.simulate_activation_quant
    drop = settings.drop_prob if act_quant else 0.0
    with P.no_grad():
        target = P.concat([runner(P.to_tensor(crops.x_float[a:a + 64]), "float")
                           for a in range(0, len(crops.x_float), 64)])
    before = _evaluate(P, runner, crops, target, act_quant, "rtn")
    params = []
    for name in unit.convs:
        st = states[name]
        st.v = P.create_parameter(st.w.shape, "float32",
                                  default_initializer=P.nn.initializer.Assign(_init_v(st)))
        params.append(st.v)
    opt = P.optimizer.Adam(learning_rate=settings.lr, parameters=params)
    per_tensor, ratios = {}, {}
    for name, tensor in (learn_inputs or {}).items():
        if tensor not in per_tensor:
            per_tensor[tensor] = P.create_parameter([1], "float32",
                                                    default_initializer=P.nn.initializer.Constant(1.0))
        ratios[name] = states[name].input_ratio = per_tensor[tensor]
    act_opt = (P.optimizer.Adam(learning_rate=ACT_SCALE_LR, parameters=list(per_tensor.values()))
               if per_tensor else None)
    n = len(crops.x)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    iters = settings.epochs * steps_per_epoch
    warm = int(settings.warmup * iters)
    b0, b1 = settings.beta
    mask_all = crops.mask
    for it in range(iters):
        idx = rng.choice(n, size=min(settings.batch_size, n), replace=False)
        x = crops.x[idx]
        if settings.input_source == "quantized" and drop > 0:
            # QDrop at the unit input: each element from the float network with prob drop_prob
            keep = rng.random(x.shape) < drop
            x = np.where(keep, crops.x_float[idx], x)
        x = P.to_tensor(x)
        pred = runner(x, "soft", act_quant=act_quant, drop_prob=drop, training=True)
        rec = _masked_loss(P, pred, P.gather(target, P.to_tensor(idx)), P.to_tensor(mask_all[idx]))
        loss = rec
        if it >= warm and settings.lam > 0:
            rel = (it - warm) / max(1, iters - warm)
            beta = b1 + (b0 - b1) * (1 - rel)  # annealed: high beta first lets h move freely
            reg = 0.0
            for p_ in params:
                h = P.clip(P.nn.functional.sigmoid(p_) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
                reg = reg + (1 - P.abs(2 * h - 1) ** beta).sum()
            loss = rec + settings.lam * reg
        loss.backward()
        opt.step()
        opt.clear_grad()
        if act_opt is not None:
            act_opt.step()
            act_opt.clear_grad()
        if progress is not None and (it % 20 == 0 or it == iters - 1):
            progress.set_postfix(f"{unit.name[:40]} it {it + 1}/{iters} rec {float(rec):.4g}")
    ints = {name: hard_weight(states[name], states[name].v.numpy()) for name in unit.convs}
    after = _evaluate(P, runner, crops, target, act_quant, "hard", ints=ints)
    changed = sum(int((ints[c] != states[c].rtn).sum()) for c in unit.convs)
    total = sum(ints[c].size for c in unit.convs)
    thresholds = {}
    for name in unit.convs:
        st = states[name]
        st.v = None
        if name in ratios:
            learned = st.input_threshold * max(float(ratios[name].numpy()[0]), ACT_RATIO_MIN)
            thresholds[name] = [st.input_threshold, learned]
            st.input_threshold, st.input_ratio = learned, None
    return ints, UnitResult(unit.name, list(unit.convs), before, after, changed / max(total, 1), total,
                            iters, round(time.perf_counter() - started, 2), n, thresholds)


@dataclass
class ReconResult:
    conv_params: list  # ConvQuantParams with quantized_weight set for the learned convs
    units: list  # UnitResult
    ints: dict  # conv name -> learned int8 weight
    rtn: dict  # conv name -> round-to-nearest int8 weight
    seconds: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)  # conv name -> learned input threshold

    def summary(self, settings: ReconSettings) -> dict:
        changed = sum(int((self.ints[c] != self.rtn[c]).sum()) for c in self.ints)
        total = sum(v.size for v in self.ints.values())
        return {
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
            "units": len(self.units),
            "convs_learned": len(self.ints),
            "changed_fraction": changed / max(total, 1),
            "loss_before_total": float(sum(u.loss_before for u in self.units)),
            "loss_after_total": float(sum(u.loss_after for u in self.units)),
            "input_thresholds_learned": len(self.thresholds),
            "per_unit": [vars(u) for u in self.units],
            "seconds": self.seconds,
        }


def reconstruct(onnx_model: onnx.ModelProto, conv_params: list, images: Sequence[np.ndarray],
                input_name: str, settings: ReconSettings, float_nodes=(),
                quantized_so_far: Optional[Callable[[dict], onnx.ModelProto]] = None,
                cache_dir: Optional[Path] = None, progress: bool = True) -> ReconResult:
    """Learned rounding for every conv in conv_params (except float_nodes).

    quantized_so_far: needed for input_source 'quantized': ({conv: learned int8 weight},
    {conv: learned input threshold}) -> the deployed QDQ model with those (round-to-nearest and
    calibrated elsewhere); its conv-input tensors keep the float graph's names, so the same
    names are fetched from both.
    """
    import paddle

    from .progress import Progress

    paddle.disable_static()
    paddle.seed(settings.seed)
    seconds = {}
    keep_float = set(float_nodes)
    params = [p for p in conv_params if p.node_name not in keep_float]
    quantized = [p.node_name for p in params]
    t0 = time.perf_counter()
    units = build_units(onnx_model, quantized, settings.recon_level, settings.limit, settings.regions)
    if not units:
        raise ModelError(f"{settings.recon_level}: no reconstruction {'region' if settings.recon_level == 'region-wise' else 'layer'} "
                         f"found among the {len(quantized)} quantized convs")
    covered = {c for u in units for c in u.convs}
    missing = [q for q in quantized if q not in covered]
    if missing:
        raise ModelError(f"internal error: convs in no reconstruction unit: {missing[:5]}")
    log.info("%s reconstruction: %d %s over %d quantized convs (limit %d convs per region)",
             settings.recon_level, len(units), "regions" if settings.recon_level == "region-wise" else "layers",
             len(quantized), settings.limit)
    images = list(images)[:settings.images] if settings.images else list(images)
    sequential = settings.input_source == "quantized"
    if sequential and quantized_so_far is None:
        raise ConfigError("recon_input: quantized needs the QDQ model quantized so far")
    crops = _cached_crops(units, onnx_model, images, input_name, settings, cache_dir, progress)
    positions = crop_positions(units, len(images), settings) if sequential else None
    seconds["cache_inputs"] = round(time.perf_counter() - t0, 2)

    consts = graph_constants(onnx_model)
    by_name = {n.name: n for n in onnx_model.graph.node}
    states = {p.node_name: _conv_state(p, consts[by_name[p.node_name].input[1]]) for p in params}
    rng = np.random.default_rng(settings.seed)
    results, ints, thresholds = [], {}, {}
    input_of = {name: by_name[name].input[0] for name in states}
    learned_tensors: dict[str, float] = {}  # tensor -> threshold learned by its first reader
    t1 = time.perf_counter()
    bar = Progress(len(units), f"{settings.recon_level} reconstruction", "regions"
                   if settings.recon_level == "region-wise" else "layers", enabled=progress)
    for k, (unit, cs) in enumerate(zip(units, crops)):
        learn_inputs = {}
        if settings.act_scale == "learned":
            for c in unit.convs:
                x = input_of[c]
                if x in learned_tensors:
                    states[c].input_threshold = thresholds[c] = learned_tensors[x]
                elif x != input_name:
                    learn_inputs[c] = x
        if sequential:
            cs = quantized_crops(unit, quantized_so_far(ints, thresholds), images, input_name,
                                 settings, positions[k], cs)
        learned, res = reconstruct_unit(unit, cs, states, consts, settings, rng,
                                        progress=bar if progress else None, learn_inputs=learn_inputs)
        ints.update(learned)
        for c in res.input_thresholds:
            thresholds[c] = learned_tensors[input_of[c]] = states[c].input_threshold
        results.append(res)
        bar.update()
        log.debug("%s: loss %.5g -> %.5g, %.1f%% weights re-rounded, %.1f s", res.name, res.loss_before,
                  res.loss_after, 100 * res.changed_fraction, res.seconds)
    bar.close()
    seconds["optimise"] = round(time.perf_counter() - t1, 2)
    new_params = [with_learned(p, ints, thresholds) for p in conv_params]
    return ReconResult(new_params, results, ints, {k: s.rtn for k, s in states.items()}, seconds, thresholds)


def with_learned(p, ints: dict, thresholds: dict):
    """ConvQuantParams p with its learned int8 weight and input threshold, where learned."""
    if p.node_name in ints:
        p = replace(p, quantized_weight=ints[p.node_name])
    if p.node_name in thresholds:
        p = replace(p, input_threshold=float(thresholds[p.node_name]))
    return p


def _cached_crops(units, model, images, input_name, settings, cache_dir, progress):
    """collect_crops (the float inputs), cached on disk by everything that determines them."""
    if cache_dir is None:
        return collect_crops(units, model, images, input_name, settings, progress)
    h = hashlib.sha256()
    h.update(model.SerializeToString())
    for img in images:
        h.update(np.ascontiguousarray(img).tobytes())
    h.update(json.dumps([settings.seed, settings.crop, settings.crops_per_image,
                         [(u.input, u.output, u.margin, u.stride) for u in units]]).encode())
    path = Path(cache_dir) / f"crops-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        data = np.load(path)
        log.info("reusing cached reconstruction inputs %s", path)
        return [CropSet(data[f"x{k}"], data[f"x{k}"], data[f"m{k}"]) for k in range(len(units))]
    crops = collect_crops(units, model, images, input_name, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, c in enumerate(crops):
        arrays[f"x{k}"], arrays[f"m{k}"] = c.x, c.mask
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a killed run leaves no half-written cache
    return crops
