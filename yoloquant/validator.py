"""One validator for every backend: same images, preprocessing, decoding, NMS and COCO protocol."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .config import Config, require
from .data import CocoDetection, iterate_batches
from .errors import ModelError
from .metrics import CocoEvaluator
from .postprocess import (PostprocessSettings, check_output_shape, decode_yolov5, decode_yolox,
                          postprocess_batch)
from .preprocess import Preprocess, boxes_to_original
from .stats import RESAMPLES, SEED, DeltaCI, ImageMatches, paired_delta, resample_weights

log = logging.getLogger("yoloquant")


@dataclass
class EvalResult:
    map50_95: float
    map50: float
    images: int
    detections: int
    runtime: str
    seconds: float
    model: str = ""
    # set by compare_to: this row minus `reference`, with a paired bootstrap interval
    delta: Optional[DeltaCI] = None
    reference: Optional[dict] = None
    # per-image COCO matches behind the scores (not serialised): what compare_to resamples
    matches: Optional[ImageMatches] = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("map50_95", "map50", "images", "detections",
                                             "runtime", "seconds", "model")}
        if self.delta is not None:
            out.update(self.delta.as_dict(), reference=self.reference)
        return out


def compare_to(reference: EvalResult, rows: Sequence[EvalResult], resamples: int = RESAMPLES,
               seed: int = SEED) -> None:
    """Set each row's delta (row - reference, mAP@0.5:0.95 and mAP@0.5) with a paired bootstrap
    95% interval over the images; every row shares the same resamples."""
    if reference.matches is None or any(r.matches is None for r in rows):
        raise ValueError("compare_to needs results from validator.evaluate (per-image matches)")
    weights = resample_weights(reference.matches.images, resamples, seed)
    for r in rows:
        r.delta = paired_delta(reference.matches, r.matches, weights=weights)
        r.reference = {"model": reference.model, "runtime": reference.runtime,
                       "map50_95": reference.map50_95, "map50": reference.map50}


def input_hw(input_shape: Sequence) -> tuple[int, int]:
    """(h, w) of an NCHW model input; the model must have a static spatial size."""
    if len(input_shape) != 4 or not all(isinstance(v, int) and v > 0 for v in input_shape[2:]):
        raise ModelError(f"model input shape {list(input_shape)} is not NCHW with a fixed height "
                         f"and width; export the model with a fixed image size (e.g. 640x640)")
    return int(input_shape[2]), int(input_shape[3])


def preprocess_for(cfg: Config, input_shape: Sequence) -> Preprocess:
    """The config's preprocessing, with the arch's defaults where a key is null."""
    yolox = cfg.arch == "YOLOX"
    size = tuple(cfg.input_size) if cfg.input_size else input_hw(input_shape)
    if cfg.input_size and tuple(cfg.input_size) != input_hw(input_shape):
        raise ModelError(f"config input_size {cfg.input_size} differs from the model's input "
                         f"{list(input_shape)}; remove input_size or re-export the model")
    return Preprocess(
        input_size=size,
        pad_value=cfg.pad_value,
        pad_mode=cfg.pad_mode or ("top_left" if yolox else "center"),
        channel_order=cfg.channel_order or ("BGR" if yolox else "RGB"),
        scale=cfg.pixel_scale if cfg.pixel_scale is not None else (1.0 if yolox else 1 / 255),
    )


def postprocess_settings(cfg: Config) -> PostprocessSettings:
    return PostprocessSettings(conf_thres=cfg.conf_thres, iou_thres=cfg.iou_thres,
                               multi_label=cfg.multi_label, max_det=cfg.max_det)


def val_dataset(cfg: Config, preprocess: Preprocess, anno_path: Optional[str] = None,
                max_images: Optional[int] = None) -> CocoDetection:
    require(cfg, "val_image_dir", "val_anno_path")
    return CocoDetection(cfg.data_path(cfg.val_image_dir),
                         cfg.data_path(anno_path or cfg.val_anno_path), preprocess,
                         max_images=max_images if max_images is not None else cfg.val_max_images)


class Decoder:
    """Raw model output -> per-image detections (x1, y1, x2, y2, score, class) in input pixels."""

    def __init__(self, layout: str, input_size: tuple[int, int], settings: PostprocessSettings):
        self.layout, self.input_size, self.settings = layout, input_size, settings

    def __call__(self, output: np.ndarray) -> list[np.ndarray]:
        check_output_shape(output.shape, self.input_size, self.layout)
        if self.layout == "yolox":
            decoded = decode_yolox(output, self.input_size)
        else:
            decoded = decode_yolov5(output)
        return postprocess_batch(decoded, self.settings)


def _model_batch(backend, wanted: int) -> int:
    fixed = backend.input_shape[0] if backend.input_shape else None
    if isinstance(fixed, int) and fixed > 0 and fixed != wanted:
        if wanted != 1:
            log.info("model has a fixed batch of %d; evaluating with batch %d", fixed, fixed)
        return fixed
    return wanted


def evaluate(backend, dataset: CocoDetection, decoder: Decoder, batch_size: int = 1,
             workers: int = 2, desc: str = "eval") -> EvalResult:
    """Run `backend` over the whole data set and score it with pycocotools."""
    batch_size = _model_batch(backend, batch_size)
    evaluator = CocoEvaluator(dataset.anno_path, dataset.category_ids)
    start = time.perf_counter()
    for batch in iterate_batches(dataset, batch_size=batch_size, workers=workers, desc=desc):
        for image_id, dets in batch_detections(backend, batch, decoder, batch_size):
            evaluator.add(image_id, dets)
    return scored(evaluator, dataset, backend.name, time.perf_counter() - start)


def batch_detections(backend, batch, decoder: Decoder, batch_size: int) -> list:
    """[(image id, detections in original image pixels)] of one batch (data.Batch)."""
    images = batch.images
    n = images.shape[0]
    if n < batch_size:  # a fixed-batch model needs the last batch padded
        images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    output = np.asarray(backend(images))[:n]
    found = []
    for dets, info, image_id in zip(decoder(output), batch.infos, batch.image_ids):
        dets = dets.copy()
        dets[:, :4] = boxes_to_original(dets[:, :4], info)
        found.append((image_id, dets))
    return found


def scored(evaluator: CocoEvaluator, dataset: CocoDetection, runtime: str,
           seconds: float) -> EvalResult:
    """The EvalResult of the detections gathered in `evaluator` over the whole data set."""
    stats = evaluator.summarize(dataset.image_ids)
    return EvalResult(map50_95=float(stats["map50_95"]), map50=float(stats["map50"]),
                      images=len(dataset), detections=int(stats["detections"]),
                      runtime=runtime, seconds=round(seconds, 2), matches=evaluator.matches)
