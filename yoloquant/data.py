"""Data sets: COCO detection (evaluation) and plain image folders (calibration).

Policy on bad data: *fail, never skip*. An image that is missing, unreadable or does not
match its annotation silently changes the mAP (its ground truth would count as missed, or
be dropped), so every such problem raises :class:`~yoloquant.errors.DataError` naming the
file. For calibration folders the same rule keeps runs reproducible.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import cv2
import numpy as np

from .errors import DataError
from .progress import Progress
from .preprocess import LetterboxInfo, Preprocess, letterbox

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MAX_LISTED = 5  # how many offending file names an error message shows


@dataclass
class Sample:
    tensor: np.ndarray  # (3, H, W) float32
    info: LetterboxInfo
    image_id: Optional[int]  # COCO image id; None for an ImageFolder
    file_name: str


@dataclass
class Batch:
    images: np.ndarray  # (B, 3, H, W) float32
    infos: List[LetterboxInfo]
    image_ids: List[Optional[int]]
    file_names: List[str]


def _read_image(path: Path) -> np.ndarray:
    """BGR uint8 image, or DataError naming the file."""
    try:
        # fromfile + imdecode instead of imread: works with non-ASCII paths and lets us
        # tell "cannot open" from "cannot decode"
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}. Check the file exists and is readable.") from exc
    # COCO boxes refer to the stored pixel grid, so EXIF orientation must not rotate it
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if raw.size else None
    if image is None:
        raise DataError(
            f"cannot decode image {path} ({raw.size} bytes): the file is empty, truncated or not an image. "
            "Replace it with a valid copy or remove it (and its annotations) from the data set."
        )
    return image


def _check_max_images(max_images: Optional[int]) -> None:
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or max_images < 1):
        raise DataError(f"max_images must be a positive integer or None (all images), got {max_images!r}")


def _name_list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "")


class CocoDetection:
    """COCO-format detection data set read from ``image_dir`` + ``anno_path``.

    Images are ordered by image id (deterministic across runs and machines). ``image_ids``
    restricts the set (unknown ids are an error); ``max_images`` then keeps the first N.
    Model class index ``i`` corresponds to ``category_ids[i]`` (sorted category ids, which
    for COCO is the standard 80-class order).
    """

    def __init__(
        self,
        image_dir: Union[str, os.PathLike],
        anno_path: Union[str, os.PathLike],
        preprocess: Preprocess,
        max_images: Optional[int] = None,
        image_ids: Optional[List[int]] = None,
    ):
        self.image_dir = Path(image_dir)
        self.anno_path = Path(anno_path)
        self.preprocess = preprocess
        _check_max_images(max_images)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist (or is not a folder). Check the dataset image_dir path.")
        self.coco = load_coco(self.anno_path)

        all_ids = sorted(self.coco.getImgIds())
        if image_ids is not None:
            wanted = sorted(set(int(i) for i in image_ids))
            unknown = sorted(set(wanted) - set(all_ids))
            if unknown:
                raise DataError(
                    f"{len(unknown)} of the requested image ids are not in {self.anno_path}: "
                    f"{_name_list([str(i) for i in unknown])}. Use ids listed in its 'images' section."
                )
            all_ids = wanted
        if max_images is not None:
            all_ids = all_ids[:max_images]
        if not all_ids:
            raise DataError(
                f"the data set is empty: {self.anno_path} lists no images"
                + (" among the requested image ids" if image_ids is not None else "")
                + ". Point anno_path at a COCO instances file with images."
            )
        self._image_ids = all_ids
        imgs = self.coco.loadImgs(all_ids)
        self._file_names = [img["file_name"] for img in imgs]
        self._sizes = [(img.get("height"), img.get("width")) for img in imgs]

        cats = sorted(self.coco.getCatIds())
        if not cats:
            raise DataError(f"{self.anno_path} has no 'categories': cannot map model classes to category ids.")
        self._category_ids = cats

        # a missing image would make the mAP wrong (its ground truth counts as missed)
        missing = [name for name in self._file_names if not (self.image_dir / name).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self._file_names)} images listed in {self.anno_path} are missing from "
                f"{self.image_dir}: {_name_list(missing)}. Evaluating without them would give a wrong mAP: "
                "copy the images there, point image_dir at the right folder, or use an annotation file for this subset."
            )

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def image_ids(self) -> List[int]:
        return list(self._image_ids)

    @property
    def file_names(self) -> List[str]:
        return list(self._file_names)

    @property
    def category_ids(self) -> List[int]:
        return list(self._category_ids)

    def load(self, i: int) -> Sample:
        path = self.image_dir / self._file_names[i]
        image = _read_image(path)
        want_h, want_w = self._sizes[i]
        if want_h is not None and want_w is not None and image.shape[:2] != (want_h, want_w):
            raise DataError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} (w x h) but {self.anno_path.name} says "
                f"{want_w}x{want_h}: the file does not match its annotations (resized or different copy?). "
                "Use the original image files."
            )
        tensor, info = letterbox(image, self.preprocess)
        return Sample(tensor, info, self._image_ids[i], self._file_names[i])


def load_coco(anno_path: Union[str, os.PathLike]):
    """pycocotools COCO object for a detection json, quietly; DataError if absent or invalid."""
    from pycocotools.coco import COCO

    anno_path = Path(anno_path)
    if not anno_path.is_file():
        raise DataError(f"annotation file {anno_path} does not exist. Check the dataset anno_path (a COCO instances_*.json).")
    try:
        with open(anno_path, "rb") as f:
            dataset = json.load(f)
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"cannot parse annotation file {anno_path}: {exc}. It must be a COCO-format JSON file.") from exc
    problems = []
    if not isinstance(dataset, dict):
        problems.append("the top level is not a JSON object")
    else:
        for key in ("images", "annotations", "categories"):
            if not isinstance(dataset.get(key), list):
                problems.append(f"'{key}' list is missing")
    if problems:
        raise DataError(f"{anno_path} is not a COCO detection file: {'; '.join(problems)}.")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise DataError(f"{anno_path} has a malformed entry ({type(exc).__name__}: {exc}); each image needs 'id' and "
                        "'file_name', each annotation 'image_id', 'category_id' and 'bbox'.") from exc
    return coco


class ImageFolder:
    """Images directly inside ``image_dir`` (sorted by file name), e.g. for calibration.

    Not recursive: subfolders are ignored so a folder's content is exactly what is used.
    """

    def __init__(self, image_dir: Union[str, os.PathLike], preprocess: Preprocess, max_images: Optional[int] = None):
        self.image_dir = Path(image_dir)
        self.preprocess = preprocess
        _check_max_images(max_images)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist (or is not a folder). Check the calibration image_dir path.")
        names = sorted(p.name for p in self.image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if max_images is not None:
            names = names[:max_images]
        if not names:
            hint = ""
            subdirs = sorted(p.name for p in self.image_dir.iterdir() if p.is_dir())
            if subdirs:
                hint = f" It has subfolders ({_name_list(subdirs)}); point image_dir at the one holding the images."
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.image_dir}.{hint}")
        self._file_names = names

    def __len__(self) -> int:
        return len(self._file_names)

    @property
    def file_names(self) -> List[str]:
        return list(self._file_names)

    def load(self, i: int) -> Sample:
        name = self._file_names[i]
        tensor, info = letterbox(_read_image(self.image_dir / name), self.preprocess)
        return Sample(tensor, info, None, name)


def iterate_batches(
    dataset, batch_size: int = 1, workers: int = 2, desc: str = "images", progress: bool = True
) -> Iterator[Batch]:
    """Yield batches in data set order, decoding images in a thread pool.

    Threads suffice because cv2 decode/resize release the GIL. At most a few batches are in
    flight so memory stays bounded on large sets. ``workers=0`` loads in the calling thread.
    The last batch may be smaller. A DataError from any image propagates.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    n = len(dataset)
    bar = Progress(n, desc, "img", enabled=progress)  # a bar on a terminal, log lines anyway

    def make_batch(samples: List[Sample]) -> Batch:
        return Batch(
            images=np.stack([s.tensor for s in samples]),
            infos=[s.info for s in samples],
            image_ids=[s.image_id for s in samples],
            file_names=[s.file_name for s in samples],
        )

    try:
        if workers == 0:
            for start in range(0, n, batch_size):
                samples = [dataset.load(i) for i in range(start, min(start + batch_size, n))]
                bar.update(len(samples))
                yield make_batch(samples)
            return
        window = max(2 * workers, 2 * batch_size)  # images decoded ahead of the consumer
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="yoloquant-load") as pool:
            pending: deque = deque()
            next_index = 0
            try:
                samples: List[Sample] = []
                while next_index < n or pending:
                    while next_index < n and len(pending) < window:
                        pending.append(pool.submit(dataset.load, next_index))
                        next_index += 1
                    samples.append(pending.popleft().result())
                    bar.update(1)
                    if len(samples) == batch_size:
                        yield make_batch(samples)
                        samples = []
                if samples:
                    yield make_batch(samples)
            finally:
                # on error or early stop, do not decode the images nobody will read
                for future in pending:
                    future.cancel()
    finally:
        bar.close()
