"""A small synthetic COCO-format detection data set for the offline demo ("demo shapes").

Images hold 0-9 filled shapes of 5 classes (circle, square, triangle, star, cross), rotated,
mildly stretched, from 14 px to 60% of the shorter image side, in random colours (some with
little contrast), over textured noisy backgrounds with distractor curves. Shapes may overlap
(each keeps at least 70% of its pixels visible) or be cut by the image border (at least 70%
inside). Image sizes vary (200-320 px a side, rarely square) so letterboxing matters.
Annotation boxes are the tight box of the *visible* pixels (as in COCO) and ``area`` is the
visible pixel count.

Deterministic: every image is drawn from its own random stream seeded by (seed, split,
index), and JPEGs are encoded with a fixed quality, so a run gives the same bytes every time
and the first k images of a split do not depend on how many images are generated (a test can
generate only the first 40 val images and get exactly those of the full set).

  python -m yoloquant.demo_data OUT_DIR [--n_train 2000] [--n_val 300] [--seed 0]

writes ``OUT_DIR/{train,val}/images/*.jpg`` and ``OUT_DIR/{train,val}/instances.json``.

The demo config (``configs/demo.yaml``) points ``dataset_dir`` at ``cache/demo_data``; scripts
call :func:`maybe_generate_for` with the loaded config so the data appears on first use.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .assets import REPO_ROOT
from .fileio import scratch_dir
from .progress import progress

log = logging.getLogger("yoloquant")

# Bump whenever the drawn content changes: ensure_demo_data then regenerates stale folders,
# and the committed model (models/demo_shapes.onnx) must be retrained on the new data.
GENERATOR_VERSION = 1
CLASSES = ("circle", "square", "triangle", "star", "cross")
DEFAULT_DIR = Path("cache") / "demo_data"  # relative to the current directory, as in configs
DEFAULT_N_TRAIN = 2000
DEFAULT_N_VAL = 300
DEFAULT_SIZE = (200, 320)  # min and max image side in pixels
JPEG_QUALITY = 90
META_FILE = "demo_data.json"
SPLITS = {"train": 1, "val": 2}  # part of each image's seed, so splits never share images

_MIN_OBJECT = 14  # px; smaller shapes are unrecognisable blobs
_MIN_VISIBLE = 0.7  # fraction of a shape that must stay visible (occlusion and border cuts)
_PLACEMENT_TRIES = 12


# ----------------------------------------------------------------------------- drawing
def _outline(cls: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-radius outline (K, 2) of one shape class, centred on the origin."""
    if cls == 0:  # circle
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if cls == 1:  # square
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8
    if cls == 2:  # equilateral triangle
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if cls == 3:  # 5-point star, inner radius varies so stars are not all alike
        inner = rng.uniform(0.38, 0.55)
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    # cross (plus sign) with a varying arm width
    a = rng.uniform(0.28, 0.42)
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                     [-a, a], [-1, a], [-1, -a], [-a, -a]], np.float64)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour blotches + an optional stripe/check texture + distractor curves (float32)."""
    base = rng.uniform(30, 225, 3)
    gh, gw = rng.integers(2, 9, 2)
    blotches = cv2.resize(rng.uniform(-1, 1, (gh, gw, 3)).astype(np.float32), (w, h),
                          interpolation=cv2.INTER_CUBIC)
    img = base.astype(np.float32) + blotches * rng.uniform(10, 60)
    kind = rng.integers(0, 3)
    if kind > 0:  # periodic texture so the background is not just smooth
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 24)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        wave = np.sin(phase)
        if kind == 2:  # checks
            wave = wave * np.sin((-xx * np.sin(angle) + yy * np.cos(angle)) * (2 * np.pi / period))
        img += wave[..., None] * rng.uniform(5, 25, 3).astype(np.float32)
    for _ in range(rng.integers(0, 5)):  # thin curves: edges that are not objects
        pts = np.cumsum(rng.normal(0, 25, (rng.integers(3, 7), 2)), 0) + rng.uniform(0, [w, h])
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.polylines(img, [pts.astype(np.int32)], False, color, int(rng.integers(1, 3)),
                      cv2.LINE_AA)
    return img


def _object_color(bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour differing from the local background by 35-255 (mean abs over channels)."""
    min_diff = rng.choice([35.0, 55.0, 85.0], p=[0.15, 0.3, 0.55])  # some low-contrast shapes
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - bg).mean() >= min_diff:
            return c
    return 255.0 - bg  # fallback: the complement always contrasts


def _draw_image(h: int, w: int, rng: np.random.Generator):
    """One image (uint8 BGR) and its objects [(class, x, y, bw, bh, visible_area)]."""
    img = _background(h, w, rng)
    owner = np.full((h, w), -1, np.int16)  # which object each pixel shows (-1: background)
    rois = []  # image-clipped box of each placed object (its pixels can only shrink)
    full_area = []  # pixels of each placed object inside the image when it was drawn
    classes = []
    n_obj = int(rng.choice(10, p=[0.03, 0.09, 0.13, 0.15, 0.15, 0.13, 0.11, 0.09, 0.07, 0.05]))
    max_size = 0.6 * min(h, w)
    for _ in range(n_obj):
        cls = int(rng.integers(0, len(CLASSES)))
        size = math.exp(rng.uniform(math.log(_MIN_OBJECT), math.log(max_size)))  # scale variety
        pts = _outline(cls, rng)
        stretch = rng.uniform(0.75, 1.33)
        pts = pts * np.array([stretch, 1 / stretch])
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        pts = pts @ rot.T
        pts *= size / 2 / np.abs(pts).max()  # the longer side of the shape's box is `size`
        visible = np.bincount(owner[owner >= 0], minlength=len(classes))
        for _try in range(_PLACEMENT_TRIES):
            # the centre may sit slightly outside the image: some shapes are cut by the border
            cx, cy = rng.uniform(-0.15 * size, [w + 0.15 * size, h + 0.15 * size])
            poly = pts + (cx, cy)
            x0, y0 = np.floor(poly.min(0)).astype(int)
            x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
            canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)  # the whole shape, unclipped
            cv2.fillPoly(canvas, [np.round((poly - (x0, y0)) * 16).astype(np.int32)], 1,
                         cv2.LINE_8, shift=4)
            total = int(canvas.sum())
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if total == 0 or ix1 <= ix0 or iy1 <= iy0:
                continue
            mask = canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0].astype(bool)
            inside = int(mask.sum())
            if inside < _MIN_VISIBLE * total:
                continue
            # would this shape hide too much of one drawn before?
            covered = owner[iy0:iy1, ix0:ix1][mask]
            covered = np.bincount(covered[covered >= 0], minlength=len(classes))
            if any(visible[k] - covered[k] < _MIN_VISIBLE * full_area[k] for k in range(len(classes))):
                continue
            break
        else:
            continue  # no valid place: fewer objects in this image
        color = _object_color(img[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))], rng)
        cv2.fillPoly(img, [np.round(poly * 16).astype(np.int32)], tuple(float(c) for c in color),
                     cv2.LINE_AA, shift=4)
        if rng.random() < 0.3:  # an outline in another shade
            edge = np.clip(color * rng.uniform(0.4, 1.6), 0, 255)
            cv2.polylines(img, [np.round(poly * 16).astype(np.int32)], True,
                          tuple(float(c) for c in edge), 1, cv2.LINE_AA, shift=4)
        owner[iy0:iy1, ix0:ix1][mask] = len(classes)
        rois.append((ix0, iy0, ix1, iy1))
        full_area.append(inside)
        classes.append(cls)

    if rng.random() < 0.3:  # mild defocus
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.2))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    objects = []
    for k, (cls, (x0, y0, x1, y1)) in enumerate(zip(classes, rois)):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k)
        objects.append((cls, x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min() + 1),
                        int(ys.max() - ys.min() + 1), int(xs.size)))
    return image, objects


# ----------------------------------------------------------------------------- data set
def _write_split(split_dir: Path, split: str, n: int, size: Tuple[int, int], seed: int) -> None:
    images_dir = split_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    lo, hi = size
    for index in progress(range(n), desc=f"demo data, {split} images", unit="img"):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        if rng.random() < 0.15:
            h = w = int(rng.integers(lo, hi + 1))
        else:
            h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        image, objects = _draw_image(h, w, rng)
        image_id = index + 1
        name = f"{image_id:06d}.jpg"
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cv2 could not encode {name}")
        (images_dir / name).write_bytes(data.tobytes())
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for cls, x, y, bw, bh, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cls + 1, "bbox": [float(x), float(y), float(bw), float(bh)],
                                "area": float(area), "iscrowd": 0})
    coco = {
        "info": {"description": f"yoloquant demo shapes, {split} split",
                 "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CLASSES)],
    }
    (split_dir / "instances.json").write_text(json.dumps(coco, separators=(",", ":")))


def _params(n_train: int, n_val: int, size: Sequence[int], seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_train": int(n_train), "n_val": int(n_val),
            "size": [int(size[0]), int(size[1])], "seed": int(seed), "jpeg_quality": JPEG_QUALITY}


def generate(out_dir: Union[str, os.PathLike], n_train: int = DEFAULT_N_TRAIN,
             n_val: int = DEFAULT_N_VAL, size: Sequence[int] = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Write the data set into ``out_dir`` (created; existing files with the same names are
    overwritten). ``size`` is (min, max) of each image side in pixels. Returns ``out_dir``."""
    lo, hi = int(size[0]), int(size[1])
    if not 64 <= lo <= hi:
        raise ValueError(f"size must be (min, max) image sides with 64 <= min <= max, got {size!r}")
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train}, {n_val}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        _write_split(out / split, split, n, (lo, hi), seed)
    (out / META_FILE).write_text(json.dumps(_params(n_train, n_val, (lo, hi), seed), indent=2) + "\n")
    return out


def _is_current(path: Path, params: dict) -> bool:
    try:
        return json.loads((path / META_FILE).read_text()) == params
    except (OSError, ValueError):
        return False


def ensure_demo_data(out_dir: Union[str, os.PathLike] = DEFAULT_DIR, n_train: int = DEFAULT_N_TRAIN,
                     n_val: int = DEFAULT_N_VAL, size: Sequence[int] = DEFAULT_SIZE,
                     seed: int = 0) -> Path:
    """The data set at ``out_dir``, generated first when absent or made with other parameters
    (or an older generator). Generation happens in a temporary folder beside ``out_dir`` that
    is renamed into place, so an interrupted run never leaves a half-written data set and
    concurrent callers end up with one complete copy. The meta file is written last, so its
    presence marks a complete set."""
    out = Path(out_dir)
    params = _params(n_train, n_val, size, seed)
    if _is_current(out, params):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # a pid-named scratch folder: one left by a killed run is removed here by the next
    tmp = scratch_dir(out.parent, f".{out.name}.tmp-")
    log.info("first use of the demo: generating its data set (%d train + %d val synthetic images) "
             "into %s; this takes under a minute, once", n_train, n_val, out)
    start = time.perf_counter()
    try:
        generate(tmp, n_train=n_train, n_val=n_val, size=size, seed=seed)
        if out.exists():
            if _is_current(out, params):  # another process finished first
                return out
            # stale set: move it aside first (rename is atomic), then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _is_current(out, params):  # the rename lost a race to a complete set only
                raise
        log.info("demo data set ready in %s (%.0f s)", out, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_demo_dataset_dir(dataset_dir: Union[str, os.PathLike]) -> bool:
    """True when ``dataset_dir`` is the default demo folder: ``cache/demo_data`` under the
    current directory (how configs resolve it) or under the repository."""
    target = Path(dataset_dir).resolve()
    return target in (DEFAULT_DIR.resolve(), (REPO_ROOT / DEFAULT_DIR).resolve())


def maybe_generate_for(cfg) -> Optional[Path]:
    """Generate the demo data set when a loaded config needs it and it is missing.

    Every job calls it right after ``load_config``. Acts only when
    ``cfg.dataset_dir`` is the default demo folder (:func:`is_demo_dataset_dir`), so configs
    for real data are never touched. Returns the folder when it acted (generated or found up
    to date), else None. Takes 16 s of CPU for the default 2000 + 300 images when generating.
    """
    if not is_demo_dataset_dir(cfg.dataset_dir):
        return None
    return ensure_demo_data(cfg.dataset_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic demo-shapes COCO data set.")
    parser.add_argument("out_dir", help="output folder (gets train/ and val/)")
    parser.add_argument("--n_train", type=int, default=DEFAULT_N_TRAIN)
    parser.add_argument("--n_val", type=int, default=DEFAULT_N_VAL)
    parser.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("MIN", "MAX"),
                        help="range of image sides in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    generate(args.out_dir, n_train=args.n_train, n_val=args.n_val, size=args.size, seed=args.seed)
    print(f"wrote {args.n_train} train + {args.n_val} val images to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
