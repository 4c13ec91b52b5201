"""COCO mAP with pycocotools, from per-image detections in original image pixels."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from .data import load_coco
from .errors import DataError, ModelError
from .stats import ImageMatches

log = logging.getLogger(__name__)


class CocoEvaluator:
    """Collect detections per image, then compute COCO box mAP.

    ``category_ids[i]`` is the COCO category id of model class ``i`` (use
    ``CocoDetection.category_ids``).

    No detections at all: pycocotools cannot load an empty result list, yet a broken
    (e.g. badly quantized) model finding nothing is a legitimate outcome to report, not a
    crash. :meth:`summarize` then returns ``map50_95 = map50 = 0.0`` with ``detections: 0``
    and logs a warning, so callers can tell it apart from a low real score.
    """

    def __init__(self, anno_path: Union[str, os.PathLike], category_ids: Sequence[int]):
        self.anno_path = anno_path
        self.coco = load_coco(anno_path)
        self.category_ids = np.asarray(list(category_ids), dtype=np.int64)
        if self.category_ids.size == 0:
            raise DataError("CocoEvaluator needs the category ids of the model classes; got an empty list.")
        unknown = sorted(set(self.category_ids.tolist()) - set(self.coco.getCatIds()))
        if unknown:
            raise DataError(f"category ids {unknown[:5]} are not in {anno_path}; take them from the same annotation file.")
        self._known_images = set(self.coco.getImgIds())
        self._dets: Dict[int, np.ndarray] = {}  # image id -> (M, 7) rows for COCO.loadRes
        self.report = ""
        self.matches = None  # stats.ImageMatches of the last summarize(), for bootstrap intervals

    def add(self, image_id: int, dets: np.ndarray) -> None:
        """Record the detections ``(M, 6)`` [x1, y1, x2, y2, score, class] of one image, in
        original image pixels. An empty array records that the image was evaluated."""
        image_id = int(image_id)
        if image_id not in self._known_images:
            raise DataError(f"image id {image_id} is not in {self.anno_path}; evaluate images of that annotation file.")
        if image_id in self._dets:
            raise ValueError(f"detections for image id {image_id} were already added; add each image once.")
        dets = np.asarray(dets, dtype=np.float64)
        if dets.size == 0:
            dets = dets.reshape(0, 6)  # accept [] / (0,) for "nothing found"
        if dets.ndim != 2 or dets.shape[1] != 6:
            raise ValueError(f"detections must be an (M, 6) array [x1, y1, x2, y2, score, class], got shape {dets.shape}")
        classes = dets[:, 5].astype(np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= self.category_ids.size):
            raise ModelError(
                f"the model predicts class index {int(classes.max())} but the annotation file has "
                f"{self.category_ids.size} categories: the model's classes must match the data set's categories."
            )
        rows = np.empty((dets.shape[0], 7), dtype=np.float64)
        rows[:, 0] = image_id
        rows[:, 1:3] = dets[:, 0:2]
        rows[:, 3:5] = dets[:, 2:4] - dets[:, 0:2]  # xyxy -> xywh
        rows[:, 5] = dets[:, 4]
        rows[:, 6] = self.category_ids[classes]
        self._dets[image_id] = rows

    @property
    def image_ids(self) -> List[int]:
        """Images added so far, sorted."""
        return sorted(self._dets)

    def _rows(self, image_ids: Iterable[int]) -> np.ndarray:
        parts = [self._dets[i] for i in image_ids if i in self._dets]
        return np.concatenate(parts) if parts else np.zeros((0, 7))

    def results(self, image_ids: Optional[Sequence[int]] = None) -> List[dict]:
        """Detections as a COCO results list (what ``--save-json`` style outputs contain)."""
        rows = self._rows(self.image_ids if image_ids is None else image_ids)
        return [
            {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [round(v, 3) for v in r[1:5]], "score": round(r[5], 5)}
            for r in rows.tolist()
        ]

    def save_json(self, path: Union[str, os.PathLike], image_ids: Optional[Sequence[int]] = None) -> None:
        with open(path, "w") as f:
            json.dump(self.results(image_ids), f)

    def summarize(self, image_ids: Optional[Sequence[int]] = None) -> dict:
        """COCO box mAP over ``image_ids`` (default: every image added).

        Images in ``image_ids`` never passed to :meth:`add` count as having no detections.
        Returns ``map50_95``, ``map50``, ``images``, ``detections`` and ``stats`` (the 12
        COCOeval numbers). The pycocotools printout is kept in ``self.report``, the per-image
        matches (for paired bootstrap intervals, yoloquant.stats) in ``self.matches``.
        """
        from pycocotools.cocoeval import COCOeval

        ids = sorted(set(int(i) for i in (self.image_ids if image_ids is None else image_ids)))
        if not ids:
            raise ValueError("no images to evaluate: add detections first or pass image_ids.")
        unknown = [i for i in ids if i not in self._known_images]
        if unknown:
            raise DataError(f"image ids {unknown[:5]} are not in {self.anno_path}.")
        if not self.coco.getAnnIds(imgIds=ids, iscrowd=False):
            raise DataError(
                f"none of the {len(ids)} evaluated images has a (non-crowd) annotation in {self.anno_path}: "
                "mAP is undefined. Evaluate images with ground-truth boxes."
            )
        rows = self._rows(ids)
        if rows.shape[0] == 0:
            log.warning("no detections at all on %d images: reporting mAP 0.0 (the model finds nothing)", len(ids))
            self.report = f"no detections on {len(ids)} images: mAP reported as 0.0\n"
            self.matches = ImageMatches.without_detections(ids, self._gt_counts(ids))
            return {"map50_95": 0.0, "map50": 0.0, "images": len(ids), "detections": 0, "stats": [0.0] * 12}

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):  # pycocotools prints progress and the table
            result_coco = self.coco.loadRes(rows)
            evaluator = COCOeval(self.coco, result_coco, iouType="bbox")
            evaluator.params.imgIds = ids
            evaluator.evaluate()
            self.matches = ImageMatches.from_cocoeval(evaluator)
            evaluator.accumulate()
            evaluator.summarize()
        self.report = buffer.getvalue()
        stats = [float(s) for s in evaluator.stats]
        return {"map50_95": stats[0], "map50": stats[1], "images": len(ids), "detections": int(rows.shape[0]), "stats": stats}

    def _gt_counts(self, ids: Sequence[int]) -> np.ndarray:
        """(images, categories) ground-truth boxes COCOeval counts for area 'all' (not crowd)."""
        cats = sorted(self.coco.getCatIds())
        column = {c: j for j, c in enumerate(cats)}
        counts = np.zeros((len(ids), len(cats)), dtype=np.int64)
        for i, image_id in enumerate(ids):
            for ann in self.coco.imgToAnns.get(image_id, []):
                if not ann.get("iscrowd", 0) and 0 <= ann["area"] <= 1e5 ** 2:
                    counts[i, column[ann["category_id"]]] += 1
        return counts
