"""Paired bootstrap confidence intervals for COCO mAP differences, without re-running COCOeval.

A mAP difference between two models on 109 images moves by about a point with the image set,
so every printed delta carries a 95% interval: images are resampled with replacement (the same
resample for both models) and the delta recomputed. Re-running pycocotools per resample would
cost ~2 s each; instead COCOeval.evaluate() runs once per model and its per-image matches
(which detection matched which ground truth at each IoU threshold) are reduced here to what AP
needs, so the AP of any *weighting* of the images (a resample = integer multiplicities) is a
few vectorised numpy operations.

Why that is exact: pycocotools' AP of a category at one IoU threshold is the mean over 101
recall thresholds r of max{precision_j : recall_j >= r}, over the detections j sorted by score.
Only the true-positive detections matter in that max (a false positive never raises precision
and never reaches a new recall); false positives matter only through the count before each true
positive. An image drawn w times contributes its detections w times at the same scores, which is
the same as one detection of weight w. So per (category, IoU threshold) we keep, in score order,
the image of each true positive and the per-image count of false positives since the previous
one (a sparse matrix); a resample's cumulative TP/FP counts are then a gather and a sparse
product. With unit weights the same floating-point operations as pycocotools' accumulate() run
on the same numbers: stats[0] and stats[1] agree to ~1e-16 (tests/test_stats.py, synthetic
scenes and real yolov5n detections), and integer weights agree with pycocotools run on the
images really repeated. (Detections of different images with exactly equal scores keep
pycocotools' order, by image; a repeated image's copies then sit together.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

RESAMPLES = 1000  # bootstrap resamples behind every printed interval
LEVEL = 0.95
SEED = 0
_CHUNK = 256  # resamples computed at once (bounds memory: chunk x true positives floats)
_EPS = np.spacing(1)  # pycocotools' guard in precision = tp / (tp + fp + eps)
MAX_SNR_DB = 300.0  # reported for bit-identical outputs (a noise-to-signal ratio of 0)
CI_NOTE = (f"95% CI: paired bootstrap over images ({RESAMPLES} resamples, basic interval), "
           "the same resample for both models")


@dataclass(frozen=True)
class ImageMatches:
    """One model's COCO matching on an image set, reduced to what AP under image weights needs.

    Segments are (category, IoU threshold) pairs, for every category with ground truth in the
    image set; each holds its true positives in pycocotools' score order.
    """

    image_ids: tuple  # the evaluated images, sorted (COCOeval's imgIds); weights index these
    gt_counts: np.ndarray  # (I, K) non-ignored ground-truth boxes per image and category
    seg_category: np.ndarray  # (S,) index into gt_counts' columns
    seg_iou: np.ndarray  # (S,) IoU threshold index
    seg_start: np.ndarray  # (S + 1,) offsets of each segment's true positives
    tp_image: np.ndarray  # (P,) image index of each true positive
    fp_before: object  # scipy.sparse.csr_matrix (P, I): false positives since the previous TP
    rec_thrs: np.ndarray  # pycocotools' 101 recall thresholds
    n_iou: int
    iou50: int  # index of IoU 0.5 (mAP50)

    @property
    def images(self) -> int:
        return len(self.image_ids)

    def same_ground_truth(self, other: "ImageMatches") -> bool:
        return self.image_ids == other.image_ids and np.array_equal(self.gt_counts, other.gt_counts)

    @classmethod
    def from_cocoeval(cls, ev) -> "ImageMatches":
        """From a pycocotools COCOeval after evaluate() (bbox, useCats, default maxDets)."""
        p = ev.params
        if not ev.evalImgs or p.maxDets[-1] != 100 or not p.useCats:
            raise ValueError("ImageMatches needs a COCOeval after evaluate() with per-category "
                             "matching and maxDets ending in 100 (what stats[0] reads)")
        image_ids = tuple(int(i) for i in p.imgIds)
        n_img, n_area = len(image_ids), len(p.areaRng)
        area_all = list(p.areaRngLbl).index("all")
        gt_rows, segments = [], []
        for k in range(len(p.catIds)):
            first = (k * n_area + area_all) * n_img
            per_image = ev.evalImgs[first:first + n_img]
            counts = np.array([0 if e is None else int(np.count_nonzero(e["gtIgnore"] == 0))
                               for e in per_image], dtype=np.int64)
            if counts.sum() == 0:
                continue  # no ground truth: COCO skips the category (precision -1)
            segments.append((len(gt_rows), per_image))
            gt_rows.append(counts)
        if not gt_rows:
            raise ValueError("no ground truth in the evaluated images: mAP is undefined")
        return cls._build(image_ids, np.stack(gt_rows, axis=1), segments, p)

    @classmethod
    def _build(cls, image_ids, gt_counts, segments, p) -> "ImageMatches":
        from scipy import sparse

        n_iou, n_img = len(p.iouThrs), len(image_ids)
        seg_cat, seg_iou, starts, tp_img, rows, cols = [], [], [0], [], [], []
        for k, per_image in segments:
            tp, fp, img = _sorted_matches(per_image, n_iou)
            for t in range(n_iou):
                positions = np.flatnonzero(tp[t])
                # false positives before each true positive, counted per image; those after the
                # last true positive cannot change the AP and are dropped
                fp_pos = np.flatnonzero(fp[t])
                slot = np.searchsorted(positions, fp_pos)  # index of the next TP
                keep = slot < positions.size
                rows.append(starts[-1] + slot[keep])
                cols.append(img[fp_pos[keep]])
                tp_img.append(img[positions])
                seg_cat.append(k)
                seg_iou.append(t)
                starts.append(starts[-1] + positions.size)
        total = starts[-1]
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        fp_before = sparse.csr_matrix((np.ones(r.size), (r, c)), shape=(total, n_img))
        fp_before.sum_duplicates()
        iou50 = int(np.flatnonzero(np.isclose(p.iouThrs, 0.5))[0])
        return cls(image_ids, gt_counts.astype(np.float64), np.asarray(seg_cat), np.asarray(seg_iou),
                   np.asarray(starts), np.concatenate(tp_img).astype(np.int64) if tp_img
                   else np.zeros(0, np.int64), fp_before, np.asarray(p.recThrs, dtype=np.float64),
                   n_iou, iou50)

    @classmethod
    def without_detections(cls, image_ids, gt_counts: np.ndarray) -> "ImageMatches":
        """A model that found nothing: AP 0 wherever there is ground truth."""
        from pycocotools.cocoeval import Params

        counts = np.asarray(gt_counts)
        keep = counts.sum(axis=0) > 0
        p = Params(iouType="bbox")
        empty = [(j, [None] * len(image_ids)) for j in range(int(keep.sum()))]
        return cls._build(tuple(int(i) for i in image_ids), counts[:, keep], empty, p)

    def average_precision(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mAP@0.5:0.95, mAP@0.5) for each row of image weights (B, I), as COCO's stats[0] and
        stats[1] would be on the images repeated that many times; NaN where no ground truth."""
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if w.shape[1] != self.images:
            raise ValueError(f"weights have {w.shape[1]} columns for {self.images} images")
        out = [self._chunk(w[i:i + _CHUNK]) for i in range(0, w.shape[0], _CHUNK)]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _chunk(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # true positives along axis 0, resamples along axis 1: the cumulative sums then add
        # whole contiguous rows
        wt = np.ascontiguousarray(w.T)
        npig = self.gt_counts.T @ wt  # (K, B) ground truth per category in each resample
        lengths = np.diff(self.seg_start)
        tp = _segment_cumsum(wt[self.tp_image], self.seg_start)
        fp = _segment_cumsum(np.asarray(self.fp_before @ wt), self.seg_start)
        ap_sums = _interpolated_ap_sums(tp, fp, np.repeat(npig[self.seg_category], lengths, axis=0),
                                        self.seg_start, self.rec_thrs)
        ap = np.zeros((self.gt_counts.shape[1], self.n_iou, w.shape[0]))
        nonempty = lengths > 0  # a segment without true positives has AP 0
        ap[self.seg_category[nonempty], self.seg_iou[nonempty]] = ap_sums / self.rec_thrs.size
        valid = npig > 0  # COCO skips a category without ground truth in the (re)sample
        n_valid = valid.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            map50_95 = np.where(valid, ap.mean(axis=1), 0.0).sum(axis=0) / n_valid
            map50 = np.where(valid, ap[:, self.iou50], 0.0).sum(axis=0) / n_valid
        return (np.where(n_valid > 0, map50_95, np.nan), np.where(n_valid > 0, map50, np.nan))

    def score(self) -> tuple[float, float]:
        """(mAP@0.5:0.95, mAP@0.5) on the images as evaluated (unit weights)."""
        a, b = self.average_precision(np.ones((1, self.images)))
        return float(a[0]), float(b[0])


def snr_db(nsr):
    """Signal-to-noise ratio in dB of a noise-to-signal power ratio (a float or an array):
    MAX_SNR_DB where the ratio is 0 (bit-identical); None (not measured) stays None. The one
    definition behind every SNR the tools print (fidelity, layer SNRs, equalization, analysis,
    the OpenVINO check)."""
    if nsr is None:
        return None
    db = np.minimum(-10.0 * np.log10(np.maximum(nsr, 1e-30)), MAX_SNR_DB)  # no log10(0)
    return float(db) if np.ndim(db) == 0 else db


def _sorted_matches(per_image: list, n_iou: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP flags (T, D) and image index (D,) of one category's detections in accumulate()'s
    order: images in COCOeval order, each image's top 100 by score, then a stable sort by score."""
    present = [(i, e) for i, e in enumerate(per_image) if e is not None]
    if not present:
        return np.zeros((n_iou, 0), bool), np.zeros((n_iou, 0), bool), np.zeros(0, np.int64)
    scores = np.concatenate([np.asarray(e["dtScores"][:100], dtype=np.float64) for _, e in present])
    order = np.argsort(-scores, kind="mergesort")
    dtm = np.concatenate([e["dtMatches"][:, :100] for _, e in present], axis=1)[:, order]
    dt_ig = np.concatenate([e["dtIgnore"][:, :100] for _, e in present], axis=1)[:, order]
    img = np.concatenate([np.full(len(e["dtScores"][:100]), i, np.int64) for i, e in present])[order]
    # as pycocotools: a match is a nonzero ground-truth id
    tp = np.logical_and(dtm, np.logical_not(dt_ig))
    fp = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
    return tp, fp, img


def _segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums along axis 0 restarting at each segment (integer-valued floats: exact)."""
    total = np.cumsum(values, axis=0)
    lengths = np.diff(starts)
    nonempty = lengths > 0
    if total.shape[0] == 0:
        return total
    first = starts[:-1][nonempty]
    base = np.where(first[:, None] > 0, total[np.maximum(first - 1, 0)], 0.0)
    total -= np.repeat(base, lengths[nonempty], axis=0)
    return total


def _interpolated_ap_sums(tp: np.ndarray, fp: np.ndarray, npig: np.ndarray, starts: np.ndarray,
                          rec_thrs: np.ndarray) -> np.ndarray:
    """Sum over COCO's recall thresholds of the interpolated precision, per non-empty segment
    and resample, from the cumulative TP and FP counts at each true positive and the
    ground-truth count there (all (P, B)).

    Threshold r reads the precision envelope at the first TP whose recall reaches r; TP j is
    that first TP for the thresholds it reaches and its predecessor does not: n_j - n_(j-1) of
    them. So the sum is sum_j envelope_j * (n_j - n_(j-1)), with no loop over thresholds."""
    with np.errstate(invalid="ignore", divide="ignore"):
        rc = tp / npig  # NaN/inf without ground truth: masked by the caller
    pr = tp / (fp + tp + _EPS)
    envelope = np.empty_like(pr)
    for a, b in zip(starts[:-1], starts[1:]):  # precision made non-increasing, per segment
        if b > a:
            envelope[a:b] = np.maximum.accumulate(pr[a:b][::-1], axis=0)[::-1]
    reached = np.searchsorted(rec_thrs, rc, side="right")
    gain = reached.copy()
    gain[1:] -= reached[:-1]
    first = starts[:-1][starts[:-1] < starts[1:]]
    gain[first] = reached[first]  # a segment's first TP is first for every threshold it reaches
    if not first.size:
        return np.zeros((0, tp.shape[1]))
    return np.add.reduceat(envelope * gain, first, axis=0)


# ---- resampling and intervals -------------------------------------------------------------
def resample_weights(n_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_images) multiplicities of a bootstrap draw of n_images with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(resamples, n_images))
    flat = (draws + n_images * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n_images).reshape(resamples, n_images)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` range of the finite values."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_interval(estimate: float, resampled: np.ndarray, level: float = LEVEL) -> "Interval":
    """The basic (reverse-percentile) bootstrap interval [2e - q_hi, 2e - q_lo].

    Why not the plain percentiles: an AP on a resample, where images repeat, is biased upward
    (the precision envelope takes maxima over a coarser curve). On the synthetic population of
    tests/test_stats.py the percentile interval of one model's mAP covered the truth in 86% of
    80-image draws, the basic one in 98%; for paired deltas both were near 95%."""
    lo, hi = percentile_interval(resampled, level)
    return Interval(float(estimate), 2 * estimate - hi, 2 * estimate - lo)


@dataclass(frozen=True)
class Interval:
    """A point estimate on the evaluated images and its bootstrap interval."""

    value: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def points(self, signed: bool = True) -> str:
        """'+0.12 [-0.30, +0.55]' in mAP points (x100)."""
        f = "{:+.2f}" if signed else "{:.2f}"
        return f"{f.format(100 * self.value)} [{f.format(100 * self.lo)}, {f.format(100 * self.hi)}]"


@dataclass(frozen=True)
class DeltaCI:
    """candidate minus reference, mAP@0.5:0.95 and mAP@0.5, with paired bootstrap intervals."""

    map50_95: Interval
    map50: Interval
    images: int
    resamples: int
    level: float = LEVEL

    def as_dict(self) -> dict:
        """The summary.json / eval --json fields (mAP units, as map50_95; x100 for points)."""
        r6 = lambda v: round(float(v), 6)  # noqa: E731
        return {"delta": r6(self.map50_95.value),
                "delta_ci95": [r6(self.map50_95.lo), r6(self.map50_95.hi)],
                "delta_map50": r6(self.map50.value),
                "delta_map50_ci95": [r6(self.map50.lo), r6(self.map50.hi)],
                "ci": {"method": "paired bootstrap over images, basic interval", "level": self.level,
                       "resamples": self.resamples, "images": self.images}}


Candidate = Union[ImageMatches, Sequence[ImageMatches]]


def paired_delta(reference: ImageMatches, candidate: Candidate, resamples: int = RESAMPLES,
                 seed: int = SEED, level: float = LEVEL,
                 weights: Optional[np.ndarray] = None) -> DeltaCI:
    """mAP(candidate) - mAP(reference) on the same images, with a paired bootstrap interval.

    `candidate` may be a list of models (e.g. calibration draws): their mean mAP is compared.
    Pass `weights` (resample_weights) to share one set of resamples across several calls."""
    group = [candidate] if isinstance(candidate, ImageMatches) else list(candidate)
    for m in group:
        if not reference.same_ground_truth(m):
            raise ValueError("paired_delta needs both models evaluated on the same images and "
                             "annotations")
    if weights is None:
        weights = resample_weights(reference.images, resamples, seed)
    unit = np.ones((1, reference.images))
    full = np.vstack([unit, weights])
    ref = reference.average_precision(full)
    cand = [m.average_precision(full) for m in group]
    intervals = []
    for metric in (0, 1):
        diff = np.mean([c[metric] for c in cand], axis=0) - ref[metric]
        intervals.append(bootstrap_interval(float(diff[0]), diff[1:], level))
    return DeltaCI(intervals[0], intervals[1], reference.images, int(weights.shape[0]), level)


def map_interval(matches: ImageMatches, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> Interval:
    """One model's mAP@0.5:0.95 with its bootstrap interval over images."""
    weights = resample_weights(matches.images, resamples, seed)
    values = matches.average_precision(np.vstack([np.ones((1, matches.images)), weights]))[0]
    return bootstrap_interval(float(values[0]), values[1:], level)
