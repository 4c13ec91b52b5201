"""The calibration and the per-layer results, saved after every layer: --resume gives the
uninterrupted result."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx

from ..config import Config, to_dict
from ..errors import ConfigError
from ..fileio import atomic_write, write_json
from ..provenance import Timer
from .files import CALIBRATED_MODEL

CHECKPOINT_FORMAT = 3  # 3: per-half results, head noise on every analysis image

# the config keys the measured numbers depend on (plus every PTQ key): a checkpoint is resumed
# only when they are unchanged; other keys (target, plots, paths of outputs...) may change
_FINGERPRINTED = ("arch", "dataset_dir", "train_image_dir", "train_anno_path", "val_image_dir",
                  "val_anno_path", "val_max_images", "fast_val_anno_path", "input_size",
                  "pad_mode", "pad_value", "channel_order", "pixel_scale", "conf_thres",
                  "iou_thres", "multi_label", "max_det", "skip_tensor_list",
                  "analysis_max_images", "analysis_proxy_images", "analysis_proxy_only",
                  "analysis_layers", "analysis_metric")


def _plain(value):
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _unplain(value):
    if isinstance(value, dict) and "ndarray" in value:
        return np.asarray(value["ndarray"], dtype=value["dtype"]).reshape(value["shape"])
    return value


def save_calibration(cal, path: Path) -> None:
    """The calibration's per-conv scales, exactly (JSON floats round-trip bit for bit), and the
    ONNX graph they refer to beside them (calibrate may have upgraded the file's opset)."""
    atomic_write(path.with_name(CALIBRATED_MODEL), lambda tmp: onnx.save(cal.onnx_model, tmp))
    params = [{f.name: _plain(getattr(p, f.name)) for f in dataclasses.fields(p)}
              for p in cal.conv_params]
    # the glue grids too: the target search measures the deployed layout, also on --resume
    ranges = {name: [float(lo), float(hi)] for name, (lo, hi) in cal.measure_tensor_ranges().items()}
    write_json(path, {"algo": cal.algo, "image_dir": cal.image_dir,
                      "image_ids": [_plain(i) for i in cal.image_ids],
                      "paddle_to_onnx": cal.paddle_to_onnx, "conv_params": params,
                      "user_skip": cal.user_skip, "tensor_ranges": ranges})


def load_calibration(cfg: Config, path: Path):
    """A ptq.Calibration rebuilt from save_calibration's file (no Paddle model: none is needed
    to build QDQ variants)."""
    from google.protobuf.message import DecodeError

    from ..ptq import Calibration
    from ..qdq import ConvQuantParams

    try:
        data = json.loads(Path(path).read_text())
        params = [ConvQuantParams(**{k: _unplain(v) for k, v in p.items()})
                  for p in data["conv_params"]]
        model = onnx.load(str(Path(path).with_name(CALIBRATED_MODEL)))
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise ConfigError(f"cannot read the saved calibration {path} ({exc}); run analysis.py "
                          "without --resume to start over") from exc
    return Calibration(cfg, data["algo"], None, None, model, params,
                       dict(data["paddle_to_onnx"]), [], data["image_ids"], data["image_dir"],
                       Timer(), user_skip=dict(data.get("user_skip", {})),
                       tensor_ranges={k: tuple(v) for k, v in data.get("tensor_ranges", {}).items()})


def _fingerprint(cfg: Config, model_sha: str, image_ids: list) -> dict:
    d = to_dict(cfg)
    flat = {k: d[k] for k in _FINGERPRINTED}
    flat.update({f"PTQ.{k}": v for k, v in d["PTQ"].items()})
    flat.update(model_sha256=model_sha, eval_image_ids=list(image_ids), format=CHECKPOINT_FORMAT)
    return json.loads(json.dumps(flat, default=str))  # the form it has once read back from JSON


def _fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; a key only one side has (a PTQ option added to the code since
    the checkpoint) counts only if it is not at its default."""
    defaults = _fingerprint(Config(), "", [])
    missing = object()
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing or b is missing:
            if (b if a is missing else a) != defaults.get(key, missing):
                diff.append(key)
        elif a != b:
            diff.append(key)
    return diff

