"""The seed's `dataset.py`: COCO data sets for a user's own script, backed by yoloquant.

PaddleSlim's YOLO-series example keeps its COCO readers in a top-level `dataset.py` that its
scripts (and scripts written from them) import:

    from dataset import COCOValDataset, COCOTrainDataset
    dataset = COCOValDataset(dataset_dir=..., image_dir="val2017",
                             anno_path="annotations/instances_val2017.json", img_size=[640, 640])
    loader = paddle.io.DataLoader(dataset, batch_size=1)
    for data in loader:  # {'image': (1, 3, H, W), 'im_id': (1, 1), 'scale_factor': (1, 2)}
        ...

The same names, arguments and items, read by yoloquant.data (missing or mismatched images and
malformed annotations are a DataError naming the file, never a skipped image) and preprocessed
by yoloquant.preprocess. The default preprocessing is the seed's: aspect-preserving resize,
image at the top left, pad 114, RGB, pixels / 255, so `scale_factor` alone maps boxes back (see
post_process.YOLOPostProcess). Unlike the seed, images without boxes are kept, as eval.py
keeps them: they count in the mAP. `preprocess=` takes another yoloquant Preprocess (e.g.
YOLOX's BGR 0-255); boxes then map back with `scale_factor` only for top-left padding.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from yoloquant.data import CocoDetection
from yoloquant.preprocess import Preprocess

__all__ = ["COCOValDataset", "COCOTrainDataset"]


def seed_preprocess(img_size: Sequence[int]) -> Preprocess:
    """The seed's preprocessing for an [h, w] input."""
    return Preprocess(input_size=(int(img_size[0]), int(img_size[1])), pad_value=114,
                      pad_mode="top_left", channel_order="RGB", scale=1 / 255)


class COCOValDataset:
    """COCO images with their ids and scale factors; usable by paddle.io.DataLoader."""

    def __init__(self, dataset_dir: Optional[str] = None, image_dir: Optional[str] = None,
                 anno_path: Optional[str] = None, img_size: Sequence[int] = (640, 640),
                 input_name: str = "x2paddle_images", preprocess: Optional[Preprocess] = None):
        self.dataset_dir = dataset_dir or "."
        self.image_dir = image_dir or "."
        self.img_size = list(img_size)
        self.input_name = input_name
        self.ann_file = os.path.join(self.dataset_dir, anno_path or "")
        self.preprocess = preprocess or seed_preprocess(img_size)
        self._data = CocoDetection(os.path.join(self.dataset_dir, self.image_dir), self.ann_file,
                                   self.preprocess)
        self.coco = self._data.coco
        self.ids = self._data.image_ids

    def __len__(self) -> int:
        return len(self._data)

    def _sample(self, idx: int):
        sample = self._data.load(idx)
        ratio = sample.info.ratio
        return sample, np.array([ratio, ratio])  # [scale_y, scale_x], as the seed's

    def __getitem__(self, idx: int) -> dict:
        sample, scale_factor = self._sample(idx)
        return {"image": sample.tensor, "im_id": np.array([sample.image_id]),
                "scale_factor": scale_factor}


class COCOTrainDataset(COCOValDataset):
    """The calibration flavour: items are {input_name: image}, a Paddle feed dict."""

    def __getitem__(self, idx: int) -> dict:
        sample, _ = self._sample(idx)
        return {self.input_name: sample.tensor}
