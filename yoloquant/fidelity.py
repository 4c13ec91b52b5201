"""How far a quantized model's outputs are from its float reference's, on images without labels.

Labelled COCO mAP on 109 images moves by about a point with the image set, which hides the
tenths that separate quantization variants. Against the float model the question changes from
"how good are the detections" to "how different are they", which needs no annotations (any
image folder will do) and is far less noisy: both models see the same images, and the float
model's own misses are not counted against the int8 one.

Two measures, both with bootstrap intervals over images:

* **mAP against the reference** (``map50_95``): the float model's detections with score >=
  ``conf`` are the ground truth, the candidate's detections (the usual protocol: conf 0.001,
  NMS, 300 per image) are scored by pycocotools against them. 1.0 for a model identical to the
  reference.
* **output SNR** (``snr_db``): signal-to-noise ratio of the candidate's raw model output
  against the reference's, box columns and score columns (objectness + classes) weighted alike
  (pixel box coordinates would otherwise outweigh the scores). 300 dB means bit-identical.

``measure_fidelity`` runs the reference once per image and every candidate beside it.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import DataError
from .stats import (LEVEL, RESAMPLES, SEED, ImageMatches, Interval, bootstrap_interval,
                    resample_weights, snr_db)

log = logging.getLogger("yoloquant")

DEFAULT_CONF = 0.25  # the reference's detections taken as ground truth (see bench/fidelity.py)
PARTS = ("box", "score")  # output columns 0:4 and 4: of a [N, 5 + classes] YOLO output


@dataclass
class OutputNoise:
    """Per image and output part: the reference's power and the candidate's error power."""

    signal: np.ndarray  # (I, parts)
    noise: np.ndarray  # (I, parts)

    def snr_db(self, weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(combined SNR (B,), per-part SNR (B, parts)) in dB for image weights (B, I); the
        combined one is that of the parts' mean noise-to-signal ratio."""
        w = np.ones((1, self.signal.shape[0])) if weights is None else np.atleast_2d(weights)
        with np.errstate(divide="ignore", invalid="ignore"):
            nsr = (w @ self.noise) / (w @ self.signal)
            parts = snr_db(nsr)
            combined = snr_db(nsr.mean(axis=1))
        return combined, parts


def output_noise(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(signal, noise) power per part of one image's raw outputs [..., 5 + classes]."""
    ref = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    err = candidate.astype(np.float64).reshape(ref.shape) - ref
    cols = (slice(0, 4), slice(4, None))
    return (np.array([np.sum(ref[:, c] ** 2) for c in cols]),
            np.array([np.sum(err[:, c] ** 2) for c in cols]))


@dataclass
class Recording:
    """The reference's and the candidates' detections (input pixels) on one image set, and the
    candidates' output noise: everything fidelity is scored from, at any confidence. For a
    CocoDetection source also each image's id and letterbox, so the same pass can be scored
    against the labels too (`labelled`)."""

    reference: list  # per image (M, 6) [x1, y1, x2, y2, score, class]
    candidates: list  # per candidate, per image (M, 6)
    noise: list  # per candidate, OutputNoise
    num_classes: int
    names: list = field(default_factory=list)
    image_ids: list = field(default_factory=list)  # None entries for unlabelled images
    infos: list = field(default_factory=list)  # preprocess.LetterboxInfo per image, or None

    @property
    def images(self) -> int:
        return len(self.reference)


@dataclass
class Fidelity:
    """One candidate against the reference, with bootstrap 95% intervals over the images."""

    map50_95: Interval  # candidate detections scored against the reference's above conf
    map50: Interval
    snr_db: Interval  # raw output against the reference's
    snr_parts_db: dict
    images: int
    conf: float
    reference_boxes: int
    name: str = ""
    matches: Optional[ImageMatches] = field(default=None, repr=False)
    noise: Optional[OutputNoise] = field(default=None, repr=False)

    def as_dict(self) -> dict:
        r = lambda v: round(float(v), 6)  # noqa: E731
        return {"map50_95": r(self.map50_95.value), "map50_95_ci95": [r(self.map50_95.lo), r(self.map50_95.hi)],
                "map50": r(self.map50.value), "map50_ci95": [r(self.map50.lo), r(self.map50.hi)],
                "snr_db": r(self.snr_db.value), "snr_db_ci95": [r(self.snr_db.lo), r(self.snr_db.hi)],
                "snr_parts_db": {k: r(v) for k, v in self.snr_parts_db.items()},
                "images": self.images, "conf": self.conf, "reference_boxes": self.reference_boxes,
                "method": "candidate detections scored by COCO mAP against the reference's with "
                          "score >= conf; SNR of the raw outputs; 95% basic bootstrap intervals over images"}


# ---- running the models -------------------------------------------------------------------
ImageSource = Union[Sequence[np.ndarray], object]  # tensors (3, H, W), or a data.ImageFolder /
# data.CocoDetection (anything with __len__ and load(i).tensor)


def _tensors(images: ImageSource, workers: int):
    """(tensor, image id or None, letterbox info or None) per image."""
    if hasattr(images, "load"):
        from .data import iterate_batches

        for batch in iterate_batches(images, batch_size=1, workers=workers, desc="fidelity images"):
            yield batch.images[0], batch.image_ids[0], batch.infos[0]
    else:
        for t in images:
            yield np.asarray(t, dtype=np.float32), None, None


def _run(backend, tensor: np.ndarray) -> np.ndarray:
    """The first output for one image, filling a fixed batch if the model has one."""
    fixed = backend.input_shape[0] if backend.input_shape else None
    x = tensor[None]
    if isinstance(fixed, int) and fixed > 1:
        x = np.repeat(x, fixed, axis=0)
    return np.asarray(backend(x))[:1]


def _backend(model):
    """A backend as given, or one opened from a path (.onnx: ONNX Runtime, folder: Paddle)."""
    if isinstance(model, (str, Path)):
        from .runtime import open_backend

        return open_backend(model)
    return model


def record(reference, candidates: Sequence, images: ImageSource, decoder, workers: int = 2,
           names: Optional[Sequence[str]] = None) -> Recording:
    """Run the reference and every candidate (backends: `backend(images) -> first output`, or
    model paths) on each image; keep their detections and the candidates' output noise. Raw
    outputs are not kept, so memory does not grow with the outputs' size."""
    reference, candidates = _backend(reference), [_backend(c) for c in candidates]
    ref_dets, cand_dets, ids, infos = [], [[] for _ in candidates], [], []
    stats = [([], []) for _ in candidates]
    num_classes = None
    for tensor, image_id, info in _tensors(images, workers):
        ids.append(image_id)
        infos.append(info)
        ref_out = _run(reference, tensor)
        num_classes = ref_out.shape[-1] - 5
        ref_dets.append(decoder(ref_out)[0])
        for c, backend in enumerate(candidates):
            out = _run(backend, tensor)
            if out.shape != ref_out.shape:
                raise DataError(f"candidate output {out.shape} differs from the reference's "
                                f"{ref_out.shape}: compare two forms of the same model")
            cand_dets[c].append(decoder(out)[0])
            signal, noise = output_noise(ref_out, out)
            stats[c][0].append(signal)
            stats[c][1].append(noise)
    if not ref_dets:
        raise DataError("no images to measure fidelity on")
    noise = [OutputNoise(np.array(s), np.array(n)) for s, n in stats]
    return Recording(ref_dets, cand_dets, noise, int(num_classes),
                     list(names) if names else [getattr(b, "name", "") for b in candidates],
                     ids, infos)


def labelled(recording: Recording, dataset) -> list:
    """validator.EvalResult (COCO mAP against the labels, with per-image matches) of the
    reference (first) and of each candidate, from a recording made on `dataset` (a
    CocoDetection): one pass over the images gives both the labelled and the label-free view."""
    from .metrics import CocoEvaluator
    from .preprocess import boxes_to_original
    from .validator import EvalResult

    if not recording.image_ids or recording.image_ids[0] is None:
        raise DataError("this recording was made on unlabelled images: record a CocoDetection")
    results = []
    for name, per_image in [("reference", recording.reference)] + list(zip(recording.names,
                                                                           recording.candidates)):
        ev = CocoEvaluator(dataset.anno_path, dataset.category_ids)
        for image_id, info, dets in zip(recording.image_ids, recording.infos, per_image):
            dets = dets.copy()
            dets[:, :4] = boxes_to_original(dets[:, :4], info)
            ev.add(image_id, dets)
        stats = ev.summarize(recording.image_ids)
        results.append(EvalResult(stats["map50_95"], stats["map50"], recording.images,
                                  stats["detections"], "", 0.0, name, matches=ev.matches))
    return results


# ---- scoring ------------------------------------------------------------------------------
def agreement_matches(reference: list, candidate: list, conf: float, num_classes: int) -> ImageMatches:
    """COCO matching of the candidate's detections against the reference's with score >= conf
    (pseudo ground truth), per image, for mAP and its bootstrap (stats.ImageMatches)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = list(range(1, len(reference) + 1))
    anns = []
    for image_id, dets in zip(ids, reference):
        for x1, y1, x2, y2, score, cls in dets[dets[:, 4] >= conf].tolist():
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": 0})
    if not anns:
        raise DataError(f"the reference model finds nothing with score >= {conf} on these "
                        f"{len(ids)} images: lower the confidence threshold or use other images")
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in ids], "annotations": anns,
                  "categories": [{"id": c + 1} for c in range(num_classes)]}
    scored = {a["category_id"] for a in anns}
    rows = [np.column_stack([np.full(len(d), i), d[:, :2], d[:, 2:4] - d[:, :2], d[:, 4], d[:, 5] + 1])
            for i, d in zip(ids, candidate) if len(d)]
    rows = np.concatenate(rows) if rows else np.zeros((0, 7))
    # categories without pseudo ground truth never change COCO's mAP: skip their matching
    rows = rows[np.isin(rows[:, 6], list(scored))]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt.createIndex()
        if rows.shape[0] == 0:
            counts = np.zeros((len(ids), num_classes), dtype=np.int64)
            for a in anns:
                counts[a["image_id"] - 1, a["category_id"] - 1] += 1
            return ImageMatches.without_detections(ids, counts)
        ev = COCOeval(gt, gt.loadRes(rows), iouType="bbox")
        ev.evaluate()
    return ImageMatches.from_cocoeval(ev)


def score(recording: Recording, index: int, conf: float = DEFAULT_CONF,
          resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Fidelity:
    """Fidelity of candidate `index` of a recording at pseudo-ground-truth confidence `conf`."""
    matches = agreement_matches(recording.reference, recording.candidates[index], conf,
                                recording.num_classes)
    weights = np.vstack([np.ones((1, matches.images)),
                         resample_weights(matches.images, resamples, seed)])
    m50_95, m50 = matches.average_precision(weights)
    noise = recording.noise[index]
    snr, parts = noise.snr_db(weights)
    interval = lambda v: bootstrap_interval(float(v[0]), v[1:], level)  # noqa: E731
    boxes = int(sum(np.count_nonzero(d[:, 4] >= conf) for d in recording.reference))
    return Fidelity(interval(m50_95), interval(m50), interval(snr),
                    {p: float(parts[0, i]) for i, p in enumerate(PARTS)}, recording.images, conf,
                    boxes, recording.names[index] if recording.names else "", matches, noise)


def measure_fidelity(reference, candidates: Sequence, images: ImageSource, decoder,
                     conf: float = DEFAULT_CONF, resamples: int = RESAMPLES, seed: int = SEED,
                     workers: int = 2, names: Optional[Sequence[str]] = None) -> list[Fidelity]:
    """Fidelity of each candidate backend against the reference backend on the images
    (tensors preprocessed for the model, or an ImageFolder / CocoDetection); `decoder` is a
    validator.Decoder (the evaluation protocol's decode and NMS)."""
    rec = record(reference, candidates, images, decoder, workers, names)
    return [score(rec, i, conf, resamples, seed) for i in range(len(candidates))]


def paired_fidelity_delta(a: Fidelity, b: Fidelity, resamples: int = RESAMPLES, seed: int = SEED,
                          level: float = LEVEL) -> dict:
    """b minus a, for two candidates scored against the same reference on the same images:
    {"map50_95": Interval, "snr_db": Interval}, paired bootstrap over images."""
    from .stats import paired_delta

    if a.images != b.images or a.conf != b.conf or not a.matches.same_ground_truth(b.matches):
        raise ValueError("paired_fidelity_delta needs two candidates of one recording, one conf")
    weights = resample_weights(a.images, resamples, seed)
    d = paired_delta(a.matches, b.matches, weights=weights, level=level)
    full = np.vstack([np.ones((1, a.images)), weights])
    snr = b.noise.snr_db(full)[0] - a.noise.snr_db(full)[0]
    return {"map50_95": d.map50_95, "snr_db": bootstrap_interval(float(snr[0]), snr[1:], level)}


def image_folder(cfg, folder: Union[str, Path], input_shape, max_images: Optional[int] = None):
    """An unlabelled image folder preprocessed as the config evaluates."""
    from .data import ImageFolder
    from .validator import preprocess_for

    return ImageFolder(folder, preprocess_for(cfg, input_shape), max_images=max_images)
