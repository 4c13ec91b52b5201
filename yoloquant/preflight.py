"""Check every input a job will need before any heavy work (conversion, calibration, imports
of Paddle), so bad input fails in about a second with one clear error, not after the PTQ.

Checked: the model exists, is ONNX, and is a detector of the config's arch (its output shape,
the check eval.py applies to the first output it decodes); the calibration images (and their
annotations) are there; with evaluation, the val annotations load and list existing images;
save_dir can be created or written (without creating it). This module must not import Paddle:
the point is to be fast.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .assets import missing_hint
from .config import Config, require
from .errors import ConfigError, DataError, ModelError

log = logging.getLogger("yoloquant")


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    input_name: str
    input_shape: tuple
    output_shape: tuple
    convs: int


def check_model(path: str | Path, arch: str, layout: str, need_convs: bool = False) -> ModelFacts:
    """ModelError unless `path` is a readable ONNX detector whose output `layout` can decode."""
    from .onnx_normalize import describe_io, load_onnx
    from .postprocess import check_output_shape
    from .validator import input_hw

    path = Path(path)
    if not path.is_file() and missing_hint(path):
        raise ModelError(f"ONNX model not found: {path}.{missing_hint(path)}")
    model = load_onnx(path)  # missing or corrupt: ModelError naming the file
    name, in_shape, _, out_shapes = describe_io(model)
    hw = input_hw(tuple(d if d > 0 else None for d in in_shape))
    shape = tuple(out_shapes[0]) if out_shapes else ()
    if not shape:  # the graph does not say and inference could not tell: run it once
        shape = _run_once(path, name, in_shape)
    try:
        check_output_shape(tuple(d if d > 0 else None for d in shape), hw, layout)
    except ModelError as exc:
        raise ModelError(f"{path} is not a {arch} detector this toolkit can read: {exc}") from None
    convs = sum(1 for n in model.graph.node if n.op_type == "Conv")
    if need_convs and convs == 0:
        raise ModelError(f"{path} has no Conv node: there is nothing to quantize (is it the "
                         "detector's export?)")
    return ModelFacts(path, name, tuple(in_shape), shape, convs)


def _run_once(path: Path, input_name: str, input_shape: tuple) -> tuple:
    import numpy as np

    from .runtime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path)
    x = np.zeros([d if d > 0 else 1 for d in input_shape], np.float32)
    return tuple(np.asarray(backend(x)).shape)


def _exists(*paths: Optional[str]) -> None:
    """DataError naming YOLOQUANT_ASSETS for a missing path inside the asset folder (other
    missing paths get the data set's own message)."""
    for p in paths:
        if p is not None and missing_hint(p):
            raise DataError(f"{p} does not exist.{missing_hint(p)}")


def _preprocess(cfg: Config, facts: ModelFacts):
    from .validator import preprocess_for

    return preprocess_for(cfg, tuple(d if d > 0 else None for d in facts.input_shape))


def check_calibration_images(cfg: Config, preprocess) -> int:
    """The calibration set the PTQ will read exists and its first image decodes; returns how
    many images it will use."""
    from .data import CocoDetection, ImageFolder

    split = cfg.PTQ.calib_split
    image_dir, anno = ((cfg.val_image_dir, cfg.val_anno_path) if split == "val"
                       else (cfg.train_image_dir, cfg.train_anno_path))
    if image_dir is None:
        raise ConfigError(f"config: {split}_image_dir must name the calibration image folder")
    count = cfg.PTQ.batch_nums * cfg.PTQ.batch_size
    image_dir = cfg.data_path(image_dir)
    _exists(image_dir, cfg.data_path(anno))
    if anno is not None:
        dataset = CocoDetection(image_dir, cfg.data_path(anno), preprocess, max_images=count)
    else:
        dataset = ImageFolder(image_dir, preprocess, max_images=count)
    dataset.load(0)
    return len(dataset)


def check_eval_images(cfg: Config, preprocess, anno_path: Optional[str] = None,
                      max_images: Optional[int] = None) -> int:
    """The evaluation annotations load and every image they list exists; the first decodes."""
    from .validator import val_dataset

    require(cfg, "val_image_dir", "val_anno_path")
    _exists(cfg.data_path(cfg.val_image_dir), cfg.data_path(anno_path or cfg.val_anno_path))
    dataset = val_dataset(cfg, preprocess, anno_path=anno_path, max_images=max_images)
    dataset.load(0)
    return len(dataset)


def check_job(cfg: Config, *, calibrate: bool = True, evaluate: bool = False,
              save_dir: Optional[str | Path] = None, eval_anno: Optional[str] = None,
              eval_max_images: Optional[int] = None) -> ModelFacts:
    """Everything a job on the config's ONNX model needs, in the order it would need it."""
    from .fileio import check_writable

    start = time.perf_counter()
    require(cfg, "model_dir")
    facts = check_model(cfg.model_dir, cfg.arch, cfg.output_layout, need_convs=calibrate)
    preprocess = _preprocess(cfg, facts)
    if calibrate:
        check_calibration_images(cfg, preprocess)
    if evaluate:
        check_eval_images(cfg, preprocess, eval_anno, eval_max_images)
    if save_dir is not None:
        check_writable(save_dir)
    log.debug("inputs checked in %.2f s", time.perf_counter() - start)
    return facts
