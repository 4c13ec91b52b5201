"""Image preprocessing: letterbox resize to the model input and the inverse box mapping.

Letterbox = resize keeping the aspect ratio so the image fits the input, then pad the rest
with a constant grey. Two pad placements exist in the wild and a model is only accurate with
the one it was trained/exported with:

* ``"center"``: YOLOv5 (pad split evenly; when the total pad is odd the extra pixel goes to the
  right/bottom, i.e. left = floor(total / 2). This is exactly what YOLOv5's
  ``round(dw - 0.1), round(dw + 0.1)`` split produces).
* ``"top_left"``: YOLOX and the PaddleSlim detection demos (image at (0, 0), all pad
  right/bottom).

The resized size is ``round(orig * ratio)`` with ``ratio = min(H / h, W / w)`` (images are
scaled up as well as down so every image fills the input the same way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

PAD_MODES = ("center", "top_left")
CHANNEL_ORDERS = ("RGB", "BGR")


def _as_triplet(value, name: str) -> Optional[Tuple[float, float, float]]:
    if value is None:
        return None
    if np.isscalar(value):
        value = (value, value, value)
    try:
        triplet = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"Preprocess.{name} must be None, a number or 3 numbers, got {value!r}") from None
    if len(triplet) != 3:
        raise ValueError(f"Preprocess.{name} must have 3 values (one per channel), got {len(triplet)}: {value!r}")
    return triplet


@dataclass(frozen=True)
class Preprocess:
    """How to turn a BGR uint8 image into the model's input tensor.

    The tensor is ``(pixel * scale - mean) / std`` in ``channel_order``, where ``mean``/``std``
    (per channel, in the output channel order) are optional. Padding is applied to the uint8
    image, so the pad pixels go through the same normalisation as real pixels.
    """

    input_size: Tuple[int, int]  # (height, width) of the model input
    pad_value: int = 114
    pad_mode: str = "center"
    channel_order: str = "RGB"
    scale: float = 1 / 255
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None

    def __post_init__(self):
        size = self.input_size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ValueError(f"Preprocess.input_size must be (height, width) with two positive integers, got {size!r}")
        # frozen dataclass: normalise types through object.__setattr__
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, (int, np.integer)) or not 0 <= self.pad_value <= 255:
            raise ValueError(f"Preprocess.pad_value must be an integer 0..255, got {self.pad_value!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"Preprocess.pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"Preprocess.channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.floating, np.integer)) or not self.scale > 0:
            raise ValueError(f"Preprocess.scale must be a positive number (e.g. 1/255 or 1), got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "mean", _as_triplet(self.mean, "mean"))
        std = _as_triplet(self.std, "std")
        if std is not None and any(s == 0 for s in std):
            raise ValueError(f"Preprocess.std must not contain 0 (it divides), got {std!r}")
        object.__setattr__(self, "std", std)


@dataclass(frozen=True)
class LetterboxInfo:
    """Geometry of one letterbox: input pixel = original pixel * ratio + pad."""

    ratio: float
    pad_x: int
    pad_y: int
    orig_h: int
    orig_w: int


def letterbox(image_bgr_uint8: np.ndarray, spec: Preprocess) -> Tuple[np.ndarray, LetterboxInfo]:
    """Resize + pad one BGR uint8 ``(h, w, 3)`` image; returns a ``(3, H, W)`` float32 tensor."""
    image = image_bgr_uint8
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"letterbox expects a BGR uint8 image of shape (h, w, 3) as cv2.imread returns, got a {desc}")
    orig_h, orig_w = image.shape[:2]
    if orig_h == 0 or orig_w == 0:
        raise ValueError(f"letterbox got an empty image of shape {image.shape}")
    in_h, in_w = spec.input_size
    ratio = min(in_h / orig_h, in_w / orig_w)
    new_w = min(in_w, max(1, int(round(orig_w * ratio))))
    new_h = min(in_h, max(1, int(round(orig_h * ratio))))
    if (new_w, new_h) != (orig_w, orig_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)

    if spec.pad_mode == "center":
        pad_x, pad_y = (in_w - new_w) // 2, (in_h - new_h) // 2
    else:
        pad_x, pad_y = 0, 0
    canvas = np.full((in_h, in_w, 3), spec.pad_value, dtype=np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = image

    if spec.channel_order == "RGB":
        canvas = canvas[:, :, ::-1]
    tensor = canvas.transpose(2, 0, 1).astype(np.float32)  # astype copies into a contiguous array
    tensor *= np.float32(spec.scale)
    if spec.mean is not None:
        tensor -= np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    if spec.std is not None:
        tensor /= np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return tensor, LetterboxInfo(ratio=float(ratio), pad_x=int(pad_x), pad_y=int(pad_y), orig_h=int(orig_h), orig_w=int(orig_w))


def boxes_to_original(boxes_xyxy: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map ``(N, 4)`` x1,y1,x2,y2 boxes from model-input pixels back to the original image,
    clipped to ``[0, orig_w] x [0, orig_h]``. Returns a new float array (input untouched)."""
    boxes = np.asarray(boxes_xyxy)
    # keep float64 precision if given, otherwise work in float32 like the model outputs
    boxes = boxes.astype(np.float64 if boxes.dtype == np.float64 else np.float32, copy=True)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes_to_original expects an (N, 4) array, got shape {boxes.shape}")
    boxes[:, [0, 2]] -= info.pad_x
    boxes[:, [1, 3]] -= info.pad_y
    boxes /= info.ratio
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, info.orig_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, info.orig_h)
    return boxes
