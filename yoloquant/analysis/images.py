"""The analysis evaluation images, decoded and preprocessed once and kept in memory."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config
from ..validator import Decoder, postprocess_settings, preprocess_for, val_dataset

log = logging.getLogger("yoloquant")


@dataclass
class EvalImages:
    """The analysis evaluation set, preprocessed once."""

    tensors: list  # (3, H, W) float32 each
    infos: list
    image_ids: list
    anno_path: Path
    category_ids: list
    decoder: Decoder
    proxy_count: int  # the first images the proxy (metric map) and the statistics use
    noise_count: int  # the first images the head noise is measured on
    scored_classes: np.ndarray  # model class indices with ground truth in these images

    def __len__(self) -> int:
        return len(self.tensors)


def load_eval_images(cfg: Config, input_shape) -> EvalImages:
    from ..data import iterate_batches

    preprocess = preprocess_for(cfg, input_shape)
    dataset = val_dataset(cfg, preprocess, anno_path=cfg.fast_val_anno_path,
                          max_images=cfg.analysis_max_images)
    tensors, infos, ids = [], [], []
    for batch in iterate_batches(dataset, batch_size=1, workers=cfg.workers,
                                 desc="analysis images"):
        tensors.extend(batch.images)
        infos.extend(batch.infos)
        ids.extend(batch.image_ids)
    megabytes = sum(t.nbytes for t in tensors) / 2 ** 20
    if megabytes > 2048:
        log.warning("the %d analysis images take %.0f MB in memory; lower analysis_max_images if "
                    "memory runs short", len(tensors), megabytes)
    proxy = min(cfg.analysis_proxy_images, len(tensors))
    if proxy < cfg.analysis_proxy_images:
        log.warning("analysis_proxy_images is %d but the evaluation set has %d images: using %d",
                    cfg.analysis_proxy_images, len(tensors), proxy)
    decoder = Decoder(cfg.output_layout, preprocess.input_size, postprocess_settings(cfg))
    # COCOeval scores each category on its own and skips those without ground truth, so
    # detections of other classes never change the mAP; dropping them before scoring saves
    # most of pycocotools' time (multi-label NMS at conf 0.001 fills every class)
    coco = dataset.coco
    with_gt = {coco.anns[a]["category_id"] for a in coco.getAnnIds(imgIds=ids)}
    scored = np.array([i for i, c in enumerate(dataset.category_ids) if c in with_gt], dtype=np.int64)
    noise = len(tensors) if cfg.analysis_metric == "noise" else proxy
    return EvalImages(tensors, infos, ids, dataset.anno_path, dataset.category_ids, decoder,
                      proxy, noise, scored)

