"""The one typed source of truth for every config key, its default and its meaning.

A config is a YAML file with the seed's flat keys plus a `PTQ:` section. `load_config` reads
it, rejects unknown keys (naming the closest valid one), reads the seed's string 'None' as
null with a warning, checks types, and resolves paths:
- `${YOLOQUANT_ASSETS}` in any path expands to the real-asset folder (see yoloquant.assets),
  the one setting that finds the optional shared models and COCO subsets;
- data paths (`*_image_dir`, `*_anno_path`) are relative to `dataset_dir` unless absolute;
- `model_dir` and `save_dir` are relative to the current directory unless absolute (as in the seed).

`python -m yoloquant.config` prints the table of keys (the README's reference is made from it).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .assets import ENV_VAR, assets_dir
from .errors import ConfigError

log = logging.getLogger("yoloquant")

ARCHES = ("YOLOv5", "YOLOv6", "YOLOv7", "YOLOX")
PTQ_ALGOS = ("KL", "hist", "avg", "mse", "emd", "abs_max", "ptf")
WEIGHT_ROUNDINGS = ("nearest", "gptq")
ANALYSIS_METRICS = ("noise", "map")
# the QDQ ONNX layouts (yoloquant/qdq/rules.py RULES, plus the earlier conv-only one); kept here
# as literals so the config module imports nothing heavy
DEPLOY_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "conv_only")
EQUALIZATIONS = ("none", "cle", "cle_gate")  # yoloquant/equalize/algorithm.py


def _key(default, help: str, choices: tuple = ()):  # noqa: A002 - 'help' reads best here
    """A config field with its documentation attached."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PTQConfig:
    """Post-training quantization settings (the `PTQ:` section)."""

    algo: str = _key("avg", "calibration algorithm; `--algo` overrides it. The seed's default "
                     "was KL; avg is the default here: on yolov5n it was the steadiest across "
                     "the val and held-out sets and calibration draws, and among the fastest "
                     "(README, Results)", PTQ_ALGOS)
    batch_nums: int = _key(10, "number of calibration batches; images = batch_nums x batch_size "
                           "(the seed: 10 x 1)")
    batch_size: int = _key(1, "calibration images per forward pass")
    calib_split: str = _key("train", "where calibration images come from; 'val' leaks the "
                            "evaluation set, as the seed did", ("train", "val"))
    hist_percent: float = _key(0.999, "percentile kept by the 'hist' algorithm")
    quantizable_op_type: list = _key(["conv2d", "depthwise_conv2d"],
                                     "Paddle op types to quantize")
    weight_quantize_type: str = _key("channel_wise_abs_max", "weight scales per output "
                                     "channel or per tensor",
                                     ("channel_wise_abs_max", "abs_max"))
    activation_quantize_type: str = _key("moving_average_abs_max", "kept for the seed's "
                                         "configs; PTQ calibrates activations with `algo`",
                                         ("moving_average_abs_max", "range_abs_max", "abs_max"))
    is_full_quantize: bool = _key(False, "quantize every supported op type, not only "
                                  "quantizable_op_type")
    onnx_format: bool = _key(True, "save Quantize/Dequantize-style programs (exportable to ONNX)")
    bias_correction: bool = _key(False, "correct conv bias for weight rounding (only has an "
                                 "effect with onnx_format: false)")


@dataclass
class Config:
    """Every top-level key. Defaults are the seed's behaviour unless noted."""

    # model
    arch: str = _key("YOLOv5", "model family: sets the output decoder and preprocessing "
                     "defaults (YOLOX: raw grid output, BGR 0-255 input)", ARCHES)
    model_dir: Optional[str] = _key(None, "path to the float .onnx model (required)")
    model_filename: Optional[str] = _key(None, "seed key; unused for ONNX models")
    params_filename: Optional[str] = _key(None, "seed key; unused for ONNX models")
    # data
    dataset_dir: str = _key(".", "root that relative data paths start from")
    train_image_dir: Optional[str] = _key(None, "calibration image folder")
    train_anno_path: Optional[str] = _key(None, "annotations of the calibration images (optional: "
                                          "a plain image folder also calibrates)")
    val_image_dir: Optional[str] = _key(None, "evaluation image folder")
    val_anno_path: Optional[str] = _key(None, "evaluation annotations (COCO json)")
    val_max_images: Optional[int] = _key(None, "evaluate on the first N images only (null: all)")
    workers: int = _key(2, "image-decoding threads")
    # preprocessing: null means the arch's default (see preprocess_for)
    input_size: Optional[list] = _key(None, "[h, w] fed to the model; null: read from the model")
    pad_mode: Optional[str] = _key(None, "letterbox placement; null: 'center' (YOLOX: 'top_left')",
                                   ("center", "top_left"))
    pad_value: int = _key(114, "letterbox fill value")
    channel_order: Optional[str] = _key(None, "null: RGB (YOLOX: BGR)", ("RGB", "BGR"))
    pixel_scale: Optional[float] = _key(None, "multiplier of 0-255 pixels; null: 1/255 "
                                        "(YOLOX: 1)")
    # post-processing / evaluation protocol (the seed's)
    conf_thres: float = _key(0.001, "score threshold before NMS")
    iou_thres: float = _key(0.65, "NMS IoU threshold")
    multi_label: bool = _key(True, "a box may be kept once per class above conf_thres")
    max_det: int = _key(300, "detections kept per image")
    # quantization
    skip_tensor_list: Optional[list] = _key(None, "convs kept float, by Paddle weight name "
                                            "(conv2d_12.w_0) or ONNX Conv node name "
                                            "(/model.24/m.2/Conv), as logs, summary.json and "
                                            "analysis.py name them")
    min_layer_snr_db: Optional[float] = _key(25.0, "convs whose 8-bit SNR, measured on the "
                                             "calibration images, is below this stay float "
                                             "(yoloquant/precision.py); null: no such check")
    max_float_conv_fraction: Optional[float] = _key(None, "at most this fraction of all convs "
                                                    "stays float (regression convs kept float "
                                                    "count too): below min_layer_snr_db the "
                                                    "lowest SNRs stay float first, the rest run "
                                                    "int8 and summary.json lists them "
                                                    "(kept_float.int8_over_budget); the convs "
                                                    "skip_tensor_list names come on top; null: "
                                                    "no limit")
    keep_regression_float: bool = _key(True, "keep the box-regression prediction convs (found "
                                       "from the graph structure, yoloquant/head.py) float")
    conv_bias_correction: bool = _key(False, "shift each int8 conv's bias by minus its mean "
                                      "output error, measured on the calibration images "
                                      "(both runtimes; yoloquant/precision.py); no measurable "
                                      "mAP gain on yolov5n, see README")
    weight_rounding: str = _key("nearest", "how int8 conv weights are rounded: to the nearest "
                                "step, or GPTQ (each rounding error compensated by the weights "
                                "not yet rounded, from the calibration images' input statistics; "
                                "yoloquant/gptq.py; +8-12 s on yolov5n). Helps per-tensor weights; "
                                "with per-channel weights no gain beyond noise (README)",
                                WEIGHT_ROUNDINGS)
    equalization: str = _key("none", "cross-layer equalization of the float model before "
                             "conversion and calibration (yoloquant/equalize/; both int8 "
                             "artifacts carry it): cle rescales Conv -> ReLU/identity/SiLU/"
                             "HardSwish -> Conv pairs so the tensor between them has even "
                             "per-channel ranges (exact for ReLU/identity, approximate for "
                             "SiLU/HardSwish); cle_gate makes SiLU/HardSwish pairs exact with a "
                             "per-channel Mul in front of their gate. A pair (or an approximate "
                             "class) that does not improve the measured 8-bit SNR is not applied; "
                             "summary.json lists pairs and range spreads", EQUALIZATIONS)
    equalization_images: int = _key(8, "calibration images (the first N) equalization measures "
                                    "ranges and errors on")
    deploy_backend: str = _key("onnxruntime", "runtime the QDQ ONNX (model_int8.onnx) is laid out "
                               "for: where int8 flows between the convs and in which form "
                               "(yoloquant/qdq/rules.py); conv_only: the earlier layout, Q/DQ "
                               "around the convs only", DEPLOY_BACKENDS)
    PTQ: PTQConfig = field(default_factory=PTQConfig,
                           metadata={"help": "post-training quantization section", "choices": ()})
    # analysis (analysis.py)
    save_dir: Optional[str] = _key(None, "analysis output folder")
    fast_val_anno_path: Optional[str] = _key(None, "small annotation file for faster analysis")
    get_target_quant_model: bool = _key(False, "search for a model meeting target_metric or target_drop")
    target_metric: Optional[float] = _key(None, "mAP@0.5:0.95 the searched model must reach")
    target_drop: Optional[float] = _key(None, "instead of target_metric: the mAP@0.5:0.95 points "
                                        "the searched model may lose against the float model on "
                                        "the analysis images (e.g. 1.0); unlike an absolute mAP "
                                        "it means the same on any image set")
    plot_hist: bool = _key(True, "draw weight histograms")
    analysis_metric: str = _key("noise", "what ranks the convs: noise = how much of the all-int8 "
                                "model's head-output noise (against float) each conv accounts "
                                "for, measured both ways (only it int8; every conv int8 but it); "
                                "no labels needed and reproducible (split_half_spearman in "
                                "analysis.txt; mAP on 109 images is not); map = the mAP drop and "
                                "gain both ways on the labelled analysis images",
                                ANALYSIS_METRICS)
    # 128: on the hard case of YOLOv6-Lite-M the noise ranking's split-half Spearman was 0.65
    # on 64 images and 0.82 on 109 (bench/experiments/ranking_noise.py); the sweep's time grows
    # linearly with it
    analysis_max_images: Optional[int] = _key(128, "evaluation images (the first N) analysis.py "
                                              "measures on: the head noise of every variant, the "
                                              "mAP of the float, all-int8 and target models "
                                              "(and of every variant with analysis_metric: map); "
                                              "null: val_max_images or all")
    analysis_proxy_images: int = _key(4, "with analysis_metric: map, the evaluation images (the "
                                      "first N) the fast proxy, the SNR of the head outputs "
                                      "against float, is measured on (with noise: all of them)")
    analysis_proxy_only: bool = _key(False, "rank layers by the noise each adds alone (one "
                                     "variant per conv instead of two; about twice as fast)")
    analysis_layers: Optional[list] = _key(None, "analyse only these convs (Paddle weight names "
                                           "like conv2d_12.w_0, or ONNX Conv node names); null: "
                                           "every quantized conv")
    # reconstruction (fine_tune.py)
    regions: Optional[list] = _key(None, "[[input, output], ...] tensor names of blocks")
    region_weights_names: Optional[list] = _key(None, "weight names of each region")
    drop_prob: float = _key(0.5, "QDrop: probability of keeping an activation float during "
                            "reconstruction (with --simulate_activation_quant; 0: plain "
                            "activation-aware rounding)")
    recon_images: Optional[int] = _key(None, "calibration images used for reconstruction (the "
                                       "first N; null: all PTQ.batch_nums x PTQ.batch_size)")
    recon_guard_images: int = _key(8, "calibration images (the last N) held out of "
                                   "reconstruction to judge it: the learned rounding is deployed "
                                   "only if the model is no further from float on them than with "
                                   "round-to-nearest weights (output SNR, yoloquant/recon_guard.py); "
                                   "0: no guard")
    recon_lambda: float = _key(0.01, "weight of AdaRound's rounding regulariser")
    recon_beta: list = _key([20.0, 2.0], "[start, end] of the regulariser's annealed beta")
    recon_warmup: float = _key(0.2, "fraction of iterations without the regulariser")
    recon_input: str = _key("float", "input each layer/region is reconstructed on: the float "
                            "network's, or the deployed QDQ model's with the rounding learned "
                            "so far (one pass per layer/region; each also learns to absorb the "
                            "error of the layers before it)", ("float", "quantized"))
    recon_act_scale: str = _key("calibrated", "activation thresholds of the quantized convs' "
                                "inputs: as calibrated, or learned with the rounding (LSQ; needs "
                                "--simulate_activation_quant; one per tensor, written into both "
                                "artifacts)", ("calibrated", "learned"))
    # conversion
    cache_dir: Optional[str] = _key(None, "X2Paddle conversion cache; null: $YOLOQUANT_CACHE or "
                                    "./cache/x2paddle")
    verify_tolerance: float = _key(1e-3, "max difference allowed between the ONNX model and its "
                                   "Paddle conversion, relative to max(1, abs(value))")

    config_path: Optional[str] = field(default=None, metadata={"internal": True})

    # ---- derived values -------------------------------------------------------------
    def data_path(self, value: Optional[str]) -> Optional[str]:
        """A data path from the config, relative to dataset_dir unless absolute."""
        if value is None:
            return None
        p = Path(value)
        return str(p if p.is_absolute() else Path(self.dataset_dir) / p)

    @property
    def output_layout(self) -> str:
        return "yolox" if self.arch == "YOLOX" else "yolov5"


def _valid_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if not match:  # fall back to case-insensitive substring, then to the whole list
        match = [v for v in valid if name.lower() in v.lower() or v.lower() in name.lower()]
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(valid)}"


def _none_strings(section: str, raw: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and value.strip() in ("None", "none", "NULL", "Null"):
            log.warning("config: %s%s is the string %r; reading it as null (write `null` in YAML)",
                        section, key, value)
            value = None
        out[key] = value
    return out


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Light type check for the few types configs use; returns the (possibly widened) value."""
    if value is None:
        if typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation):
            return None
        raise ConfigError(f"config: {where} must not be null")
    base = annotation
    if typing.get_origin(annotation) is typing.Union:
        base = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {where} must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {where} must be a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string, got {value!r}")
    elif base is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {where} must be a list, got {value!r}")
        value = list(value)
    return value


def _build(cls, raw: dict, section: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {section or 'the file'} must be a mapping of keys to values")
    valid = _valid_keys(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in _none_strings(section, raw).items():
        if key not in valid:
            raise ConfigError(f"config: unknown key '{section}{key}'; {_closest(key, valid)}")
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{key}.")
            continue
        value = _check_type(section + key, value, hints[key])
        choices = f.metadata.get("choices") or ()
        if choices and value is not None and value not in choices:
            # algorithm names are case-insensitive in paddleslim ('kl' works): accept that too
            folded = {c.lower(): c for c in choices}
            if isinstance(value, str) and value.lower() in folded:
                value = folded[value.lower()]
            else:
                raise ConfigError(f"config: {section}{key} = {value!r} is not supported; "
                                  f"choose one of {', '.join(map(str, choices))}")
        kwargs[key] = value
    return cls(**kwargs)


def _expand(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    env = {ENV_VAR: str(assets_dir())}
    env.update(os.environ)
    expanded = value
    for name in (ENV_VAR,) + tuple(k for k in os.environ if f"${{{k}}}" in value):
        expanded = expanded.replace(f"${{{name}}}", env.get(name, ""))
    if "${" in expanded:
        raise ConfigError(f"config: path {value!r} names an unset environment variable")
    return os.path.expanduser(expanded)


def _validate(cfg: Config) -> Config:
    for name in ("model_dir", "dataset_dir", "train_image_dir", "train_anno_path",
                 "val_image_dir", "val_anno_path", "fast_val_anno_path", "save_dir", "cache_dir"):
        setattr(cfg, name, _expand(getattr(cfg, name)))
    if cfg.input_size is not None:
        if len(cfg.input_size) != 2 or not all(isinstance(v, int) and v > 0 for v in cfg.input_size):
            raise ConfigError(f"config: input_size must be [height, width], got {cfg.input_size}")
    if cfg.max_float_conv_fraction is not None and not 0.0 <= cfg.max_float_conv_fraction <= 1.0:
        raise ConfigError("config: max_float_conv_fraction must be in [0, 1] (e.g. 0.1: at most "
                          f"10% of the convs float), got {cfg.max_float_conv_fraction}")
    if cfg.equalization_images < 1:
        raise ConfigError("config: equalization_images must be at least 1")
    if cfg.PTQ.batch_nums < 1 or cfg.PTQ.batch_size < 1:
        raise ConfigError("config: PTQ.batch_nums and PTQ.batch_size must be at least 1")
    if not 0.0 < cfg.PTQ.hist_percent <= 1.0:
        raise ConfigError("config: PTQ.hist_percent must be in (0, 1]")
    if cfg.weight_rounding == "gptq" and cfg.conv_bias_correction:
        raise ConfigError("config: conv_bias_correction measures the error of round-to-nearest "
                          "weights; with weight_rounding: gptq it would correct an error the "
                          "model no longer has. Set one of them: weight_rounding: nearest, or "
                          "conv_bias_correction: false")
    if cfg.analysis_max_images is not None and cfg.analysis_max_images < 1:
        raise ConfigError("config: analysis_max_images must be at least 1 (or null: all images)")
    if cfg.analysis_proxy_images < 1:
        raise ConfigError("config: analysis_proxy_images must be at least 1")
    if cfg.target_metric is not None and cfg.target_drop is not None:
        raise ConfigError("config: give target_metric (an mAP) or target_drop (points below "
                          "float), not both")
    if cfg.target_drop is not None and not 0.0 <= cfg.target_drop < 100.0:
        raise ConfigError(f"config: target_drop is in mAP points below float, e.g. 1.0; got "
                          f"{cfg.target_drop}")
    if cfg.target_metric is not None and not 0.0 < cfg.target_metric <= 1.0:
        raise ConfigError("config: target_metric is a mAP@0.5:0.95 fraction in (0, 1], "
                          f"got {cfg.target_metric}")
    return cfg


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> Config:
    """Read, check and resolve a YAML config. `overrides` are top-level keys from flags."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass --config_path with a YAML file; "
                          f"examples are in configs/)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    raw = dict(raw)
    raw.update(overrides or {})
    cfg = _build(Config, raw, "")
    cfg.config_path = str(p)
    return _validate(cfg)


def config_from_dict(raw: dict) -> Config:
    """Same checks as load_config, for configs built in code (tests, benchmarks)."""
    return _validate(_build(Config, dict(raw), ""))


def to_dict(cfg: Config) -> dict:
    """Plain dict of the resolved config (for summaries)."""
    return dataclasses.asdict(cfg)


def require(cfg: Config, *names: str) -> None:
    """Fail clearly when a key the current command needs is null."""
    missing = [n for n in names if getattr(cfg, n) is None]
    if missing:
        where = f" in {cfg.config_path}" if cfg.config_path else ""
        raise ConfigError(f"config: {', '.join(missing)} must be set{where} for this command")


def reference_table() -> str:
    """Markdown table of every key, default and meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def add(cls, prefix):
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if f.name == "PTQ":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            text = f.metadata["help"] + (f" ({' / '.join(map(str, choices))})" if choices else "")
            rows.append(f"| `{prefix}{f.name}` | `{json.dumps(default)}` | {text} |")

    add(Config, "")
    add(PTQConfig, "PTQ.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
