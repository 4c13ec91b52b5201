"""The seed's `post_process.py`: YOLO output decoding, NMS and COCO mAP for a user's own
script, backed by yoloquant.

PaddleSlim's YOLO-series example keeps these in a top-level `post_process.py`:

    from post_process import YOLOPostProcess, coco_metric
    postprocess = YOLOPostProcess(score_threshold=0.001, nms_threshold=0.65, multi_label=True)
    res = postprocess(outs, data["scale_factor"])   # {'bbox': (M, 6), 'bbox_num': (B,)}
    ...
    coco_metric(anno_file, bboxes_list, bbox_nums_list, image_id_list)  # COCOeval stats

Same names, arguments and results; the decoding and NMS are yoloquant.postprocess (the code
eval.py scores with) and the mAP is yoloquant.metrics under eval.py's protocol: boxes clipped to
the image before scoring (the seed's coco_metric did not clip), pycocotools run quietly (no
bbox.json left in the current folder; the COCOeval table is printed as the seed's was). So a
seed-style script reports the mAP eval.py reports for the same preprocessing. `outs` is a
decoded (batch, boxes, 5 + classes) YOLOv5/v6/v7 output; `bbox` rows are
[class, score, x1, y1, x2, y2] in original image pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from yoloquant.postprocess import PostprocessSettings, decode_yolov5, multiclass_nms
from yoloquant.postprocess import nms as _nms

__all__ = ["YOLOPostProcess", "YOLOv6PostProcess", "coco_metric", "nms", "box_iou", "box_area"]


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of (N, 4) x1, y1, x2, y2 boxes."""
    boxes = np.asarray(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(box1: np.ndarray, box2: np.ndarray) -> np.ndarray:
    """(N, M) IoU of two sets of x1, y1, x2, y2 boxes."""
    box1, box2 = np.asarray(box1), np.asarray(box2)
    top_left = np.maximum(box1[:, None, :2], box2[:, :2])
    bottom_right = np.minimum(box1[:, None, 2:], box2[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    return inter / (box_area(box1)[:, None] + box_area(box2) - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, highest score first."""
    return _nms(boxes, np.asarray(scores).reshape(-1), iou_threshold)


class YOLOPostProcess:
    """Decoded YOLO output -> per-image detections in original pixels (see module doc)."""

    def __init__(self, score_threshold: float = 0.25, nms_threshold: float = 0.5,
                 multi_label: bool = False, keep_top_k: int = 300):
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.multi_label = multi_label
        self.keep_top_k = keep_top_k
        # keep_top_k -1 (the seed's "keep all") becomes "all candidates"
        self.settings = PostprocessSettings(conf_thres=score_threshold, iou_thres=nms_threshold,
                                            multi_label=multi_label,
                                            max_det=keep_top_k if keep_top_k > 0 else 30000)

    def __call__(self, outs: np.ndarray, scale_factor: Sequence) -> dict:
        decoded = decode_yolov5(np.asarray(outs))
        scale_factor = np.asarray(scale_factor, dtype=np.float64).reshape(len(decoded), 2)
        rows = []
        for image, (scale_y, scale_x) in zip(decoded, scale_factor):
            s = self.settings
            dets = multiclass_nms(image, s.conf_thres, s.iou_thres, s.multi_label, s.max_det,
                                  s.max_candidates).astype(np.float64)
            boxes = dets[:, :4] / np.array([scale_x, scale_y, scale_x, scale_y])
            rows.append(np.concatenate([dets[:, 5:6], dets[:, 4:5], boxes], axis=1))
        return {"bbox": np.concatenate(rows, axis=0) if rows else np.zeros((0, 6)),
                "bbox_num": np.array([len(r) for r in rows])}


YOLOv6PostProcess = YOLOPostProcess  # the name some versions of the seed's eval.py import


def coco_metric(anno_file: str, bboxes_list: list, bbox_nums_list: list,
                image_id_list: list) -> np.ndarray:
    """COCO box mAP of collected YOLOPostProcess results; returns the 12 COCOeval stats
    (stats[0]: mAP@0.5:0.95, stats[1]: mAP@0.5) and prints COCOeval's table."""
    from yoloquant.data import load_coco
    from yoloquant.metrics import CocoEvaluator

    coco = load_coco(anno_file)
    # model class i is the i-th category id, as in the seed and in eval.py
    evaluator = CocoEvaluator(anno_file, sorted(coco.getCatIds()))
    for bboxes, nums, ids in zip(bboxes_list, bbox_nums_list, image_id_list):
        bboxes, start = np.asarray(bboxes, dtype=np.float64).reshape(-1, 6), 0
        for num, image_id in zip(np.asarray(nums).reshape(-1), np.asarray(ids).reshape(-1)):
            rows = bboxes[start:start + int(num)]
            start += int(num)
            rows = rows[rows[:, 0] >= 0]  # class -1 marks padding in Paddle's NMS outputs
            boxes = rows[:, 2:6].copy()
            info = coco.imgs.get(int(image_id), {})
            if info.get("width") and info.get("height"):
                # clipped to the image, as eval.py's validator does (the seed did not: boxes
                # reaching past the border then lose IoU; 2 points of mAP on the demo set)
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, info["width"])
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, info["height"])
            evaluator.add(int(image_id), np.concatenate([boxes, rows[:, 1:2], rows[:, 0:1]], axis=1))
    stats = evaluator.summarize()
    print(evaluator.report, end="")
    return np.asarray(stats["stats"])
