"""Decode YOLO model outputs and run non-maximum suppression (numpy only).

Both decoders produce the same layout, ``(B, N, 4 + C)``: x1, y1, x2, y2 in model-input
pixels followed by the per-class scores ``objectness * class probability``.

Supported output layouts (``arch`` in the config):

* ``"yolov5"``: ``(B, N, 5 + C)`` already decoded: cx, cy, w, h in input pixels, obj, classes.
* ``"yolox"``: ``(B, N, 5 + C)`` raw: per-cell offsets that need the grid decode
  (``xy = (p + grid) * stride``, ``wh = exp(p) * stride``), obj/classes already sigmoid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import ModelError

LAYOUTS = ("yolov5", "yolox")
DEFAULT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class PostprocessSettings:
    """NMS settings; the defaults are the usual COCO mAP evaluation settings."""

    conf_thres: float = 0.001
    iou_thres: float = 0.65
    multi_label: bool = True
    max_det: int = 300
    max_candidates: int = 30000  # boxes entering NMS, highest scores first (bounds the cost)

    def __post_init__(self):
        if not 0 <= self.conf_thres < 1:
            raise ValueError(f"PostprocessSettings.conf_thres must be in [0, 1), got {self.conf_thres!r}")
        if not 0 < self.iou_thres <= 1:
            raise ValueError(f"PostprocessSettings.iou_thres must be in (0, 1], got {self.iou_thres!r}")
        if not isinstance(self.multi_label, bool):
            raise ValueError(f"PostprocessSettings.multi_label must be true or false, got {self.multi_label!r}")
        for name in ("max_det", "max_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PostprocessSettings.{name} must be a positive integer, got {value!r}")


def _grid_rows(input_hw: Sequence[int], strides: Sequence[int]) -> int:
    h, w = input_hw
    return sum((h // s) * (w // s) for s in strides)


def check_output_shape(shape: Sequence, input_hw: Sequence[int], layout: str, strides: Sequence[int] = DEFAULT_STRIDES) -> None:
    """Raise ModelError if a model output of ``shape`` cannot be handled as ``layout``.

    ``shape`` may contain None/strings for dynamic axes (as ONNX reports them); those are
    not checked.
    """
    if layout not in LAYOUTS:
        raise ModelError(f"unsupported output layout {layout!r}: choose one of {LAYOUTS} (config key 'arch').")
    shape = tuple(shape)
    if len(shape) != 3:
        raise ModelError(
            f"model output has shape {list(shape)} but a {layout} detector outputs 3-D (batch, boxes, 5 + classes). "
            "Export the model with its detection head (no NMS, single concatenated output)."
        )
    _, rows, width = shape
    if isinstance(width, (int, np.integer)) and width < 6:
        raise ModelError(
            f"model output has {width} values per box; expected 5 + number of classes (85 for COCO). "
            "This is not a YOLO detection head output (is NMS baked into the export?)."
        )
    if not isinstance(rows, (int, np.integer)):
        return
    if isinstance(width, (int, np.integer)) and width > rows:
        # real heads have thousands of boxes and ~85 values each; the other way round is
        # the transposed (batch, 4 + classes, boxes) layout of YOLOv8-style exports
        raise ModelError(
            f"model output has shape {list(shape)}: more values per box ({width}) than boxes ({rows}). This looks like "
            "a transposed (batch, 4 + classes, boxes) YOLOv8-style head, which is not supported; "
            f"a {layout} head outputs (batch, boxes, 5 + classes)."
        )
    grid = _grid_rows(input_hw, strides)
    if layout == "yolox" and rows != grid:
        hint = ""
        if rows == 3 * grid:
            hint = " It has 3x that many rows, as an anchor-based YOLOv5 head does: set arch: yolov5."
        raise ModelError(
            f"model output has {rows} boxes but a YOLOX head on a {input_hw[0]}x{input_hw[1]} input with strides "
            f"{tuple(strides)} has {grid}.{hint} Check arch and the input size."
        )
    if layout == "yolov5" and rows == grid:
        raise ModelError(
            f"model output has {rows} boxes, one per grid cell on a {input_hw[0]}x{input_hw[1]} input: that is an "
            "anchor-free (YOLOX-style) raw head, not a decoded YOLOv5 output. Set arch: yolox."
        )


def _check_array(output: np.ndarray, name: str) -> np.ndarray:
    output = np.asarray(output)
    if output.ndim != 3 or output.shape[2] < 6:
        raise ModelError(f"{name} expects a (batch, boxes, 5 + classes) output, got shape {list(output.shape)}.")
    return output


def _to_xyxy_scores(cxcy: np.ndarray, wh: np.ndarray, obj: np.ndarray, cls: np.ndarray) -> np.ndarray:
    out = np.empty(cxcy.shape[:2] + (4 + cls.shape[2],), dtype=np.float32)
    half = wh / 2
    out[..., 0:2] = cxcy - half
    out[..., 2:4] = cxcy + half
    np.multiply(cls, obj[..., None], out=out[..., 4:])
    return out


def decode_yolov5(output: np.ndarray) -> np.ndarray:
    """``(B, N, 5 + C)`` cx,cy,w,h,obj,cls -> ``(B, N, 4 + C)`` x1,y1,x2,y2, obj * cls."""
    output = _check_array(output, "decode_yolov5").astype(np.float32, copy=False)
    return _to_xyxy_scores(output[..., 0:2], output[..., 2:4], output[..., 4], output[..., 5:])


def yolox_grid(input_hw: Sequence[int], strides: Sequence[int] = DEFAULT_STRIDES) -> Tuple[np.ndarray, np.ndarray]:
    """Cell offsets ``(N, 2)`` (x, y) and per-row stride ``(N, 1)`` in YOLOX output order
    (stride by stride, each row-major with x fastest)."""
    h, w = input_hw
    cells, row_strides = [], []
    for s in strides:
        gy, gx = np.meshgrid(np.arange(h // s), np.arange(w // s), indexing="ij")
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        row_strides.append(np.full((gx.size, 1), s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(row_strides).astype(np.float32)


def decode_yolox(output: np.ndarray, input_hw: Sequence[int], strides: Sequence[int] = DEFAULT_STRIDES) -> np.ndarray:
    """Raw YOLOX ``(B, N, 5 + C)`` -> ``(B, N, 4 + C)`` x1,y1,x2,y2, obj * cls."""
    output = _check_array(output, "decode_yolox").astype(np.float32, copy=False)
    check_output_shape(output.shape, input_hw, "yolox", strides)
    grid, stride = yolox_grid(input_hw, strides)
    cxcy = (output[..., 0:2] + grid) * stride
    with np.errstate(over="ignore"):  # a huge logit gives an inf box that NMS/clipping handle
        wh = np.exp(output[..., 2:4]) * stride
    return _to_xyxy_scores(cxcy, wh, output[..., 4], output[..., 5:])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: Optional[int] = None) -> np.ndarray:
    """Greedy NMS. Returns indices of kept boxes, highest score first.

    A box is suppressed when its IoU with a higher-scoring kept box is > ``iou_thres``
    (torchvision's rule; zero-area boxes never suppress or get suppressed). Equal scores keep
    input order. The loop runs once per *kept* box; each step suppresses all overlapping
    boxes at once with numpy. Greedy NMS keeps boxes in score order, so stopping at
    ``max_keep`` gives exactly the first ``max_keep`` boxes of a full run.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"nms expects boxes (N, 4) and scores (N,), got {boxes.shape} and {scores.shape}")
    idx = np.argsort(-scores, kind="stable")
    # sorted, contiguous 1-D coordinate arrays: the loop then only slices and compresses them
    # (about 2x faster than re-gathering rows of an (N, 4) array every step)
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[idx, k]) for k in range(4))
    area = (x2 - x1) * (y2 - y1)
    limit = idx.size if max_keep is None else max_keep
    keep = []
    while idx.size and len(keep) < limit:
        keep.append(idx[0])
        w = np.minimum(x2[0], x2[1:]) - np.maximum(x1[0], x1[1:])
        h = np.minimum(y2[0], y2[1:]) - np.maximum(y1[0], y1[1:])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        # iou <= t  <=>  inter <= t * union, avoiding a division. inter > 0 implies both boxes
        # have positive area (union > 0); inter == 0 is IoU 0 even for empty/inverted boxes
        survive = (inter == 0) | (inter <= iou_thres * (area[0] + area[1:] - inter))
        idx, x1, y1, x2, y2, area = (a[1:][survive] for a in (idx, x1, y1, x2, y2, area))
    return np.asarray(keep, dtype=np.int64)


def multiclass_nms(
    boxes_scores: np.ndarray,
    conf_thres: float = 0.001,
    iou_thres: float = 0.65,
    multi_label: bool = True,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> np.ndarray:
    """Class-aware NMS for one image. ``(N, 4 + C)`` -> ``(M, 6)`` float32
    [x1, y1, x2, y2, score, class], sorted by score, ``M <= max_det``.

    ``multi_label``: a box becomes one candidate per class whose score > ``conf_thres``
    (as YOLOv5's mAP evaluation does); otherwise only its best class is considered.
    Classes never suppress each other: each class's boxes are shifted to their own region
    of the plane before one NMS pass.
    """
    boxes_scores = np.asarray(boxes_scores)
    if boxes_scores.ndim != 2 or boxes_scores.shape[1] < 5:
        raise ValueError(f"multiclass_nms expects (N, 4 + classes), got shape {boxes_scores.shape}")
    boxes = boxes_scores[:, :4]
    class_scores = boxes_scores[:, 4:]
    if multi_label:
        # most rows have no class above the threshold: drop them before the 2-D nonzero
        candidate_rows = np.flatnonzero(class_scores.max(axis=1) > conf_thres)
        sub_rows, classes = np.nonzero(class_scores[candidate_rows] > conf_thres)
        rows = candidate_rows[sub_rows]
        scores = class_scores[rows, classes]
    else:
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(classes)), classes]
        rows = np.nonzero(scores > conf_thres)[0]
        classes, scores = classes[rows], scores[rows]
    # non-finite boxes (overflowed exp in a broken model) cannot be ranked by IoU
    finite = np.isfinite(boxes[rows]).all(axis=1) & np.isfinite(scores)
    if not finite.all():
        rows, classes, scores = rows[finite], classes[finite], scores[finite]
    if scores.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    if scores.size > max_candidates:
        top = np.argpartition(-scores, max_candidates - 1)[:max_candidates]
        rows, classes, scores = rows[top], classes[top], scores[top]

    cand = boxes[rows].astype(np.float64)
    # shift each class by a multiple of the coordinate span so boxes of different classes never overlap
    span = cand.max() - cand.min() + 1.0
    shifted = cand + (classes.astype(np.float64) * span)[:, None]
    keep = nms(shifted, scores, iou_thres, max_keep=max_det)

    out = np.empty((keep.size, 6), dtype=np.float32)
    out[:, :4] = cand[keep]
    out[:, 4] = scores[keep]
    out[:, 5] = classes[keep]
    return out


def postprocess_batch(decoded: np.ndarray, settings: PostprocessSettings = PostprocessSettings()) -> List[np.ndarray]:
    """Apply :func:`multiclass_nms` to each image of a decoded ``(B, N, 4 + C)`` batch."""
    return [
        multiclass_nms(
            image,
            conf_thres=settings.conf_thres,
            iou_thres=settings.iou_thres,
            multi_label=settings.multi_label,
            max_det=settings.max_det,
            max_candidates=settings.max_candidates,
        )
        for image in decoded
    ]
