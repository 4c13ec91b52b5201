"""Activation thresholds computed in numpy: the calibration algorithms' per-tensor math.

What Paddle's PostTrainingQuantization computes in pure Python per tensor (KL's divergence
search, mse / emd's candidate search, ptf's power-of-two rule), here as numpy functions that
choose the same thresholds, seconds instead of minutes per model. `calibration.py` plugs them
into Paddle's sampling; tests/test_calibration.py checks them against upstream.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np


# --------------------------------------------------------------------------------------------
# KL threshold search
# --------------------------------------------------------------------------------------------

def _kl_candidates(hist: np.ndarray) -> np.ndarray:
    """The candidate clip indices of upstream `cal_kl_threshold`, in its order.

    Candidate i keeps bins [0, i). Upstream tries i = int((n-1)/2) .. n-1 and skips every i
    whose last kept bin hist[i-1] is empty. (i = 0, reachable only for n <= 2, makes upstream
    crash, so it is left out.)
    """
    n = hist.shape[0]
    cand = np.arange(max(int((n - 1) * 0.5), 1), n)
    return cand[hist[cand - 1] != 0]


def kl_divergences(hist: np.ndarray, candidates: np.ndarray, bits: int) -> np.ndarray:
    """KL(P || Q) for every candidate clip index, as upstream `cal_kl_threshold` defines P and Q.

    For candidate i upstream builds, from the histogram h (n bins) and L = 2**(bits-1) - 1:
    - P = h[0:i] with the outliers sum(h[i:]) added to the last bin P[i-1];
    - L levels over bins [0, i): level k spans [k*m, (k+1)*m) with m = i // L, the last level
      also takes the remainder up to i; C_k = sum of h over the level, N_k = its non-empty bins;
    - Q[j] = C_k / N_k for a non-empty bin j of level k, 0 for an empty one ("expand");
    - KL = (sum_{P>0} P log(Qsum P) - sum_{P>0} P log(T Q)) / T, T = sum(h), Qsum = sum(Q).
    Since Q is constant on the non-empty bins of a level, the sums collapse per level:
        sum_{P>0} P log(Qsum P) = T log(Qsum) + sum_{j<i-1, h>0} h log h + P[i-1] log P[i-1]
        sum_{P>0} P log(T Q)    = T log(T) + sum_k C_k log(C_k / N_k) + outliers log(C_L/N_L)
    (Qsum = sum_k C_k = sum(h[0:i])), so each candidate costs O(L) with prefix sums instead
    of Python loops over its bins. The values equal upstream's up to float rounding.
    """
    h = np.asarray(hist, dtype=np.float64)
    i = np.asarray(candidates, dtype=np.int64)
    levels = 2 ** (bits - 1) - 1
    total = h.sum()
    nonzero = h > 0
    # prefix sums: S[k] = sum(h[:k]), Z[k] = non-empty bins in h[:k], HL[k] = sum(h log h)
    S = np.concatenate(([0.0], np.cumsum(h)))
    Z = np.concatenate(([0], np.cumsum(nonzero)))
    hlogh = np.zeros_like(h)
    hlogh[nonzero] = h[nonzero] * np.log(h[nonzero])
    HL = np.concatenate(([0.0], np.cumsum(hlogh)))

    merged = (i // levels)[:, None]                      # bins per level (m)
    k = np.arange(levels)[None, :]
    lo = k * merged
    hi = np.where(k == levels - 1, i[:, None], (k + 1) * merged)
    C = S[hi] - S[lo]
    N = Z[hi] - Z[lo]
    used = C > 0                                          # C > 0 exactly when N > 0
    level_term = np.where(used, C * np.log(np.where(used, C / np.maximum(N, 1), 1.0)), 0.0)

    outliers = total - S[i]
    last = h[i - 1] + outliers                            # P[i-1] > 0 for every candidate
    last_q = C[:, -1] / N[:, -1]                          # Q of bin i-1 (last level)
    outlier_term = np.where(outliers > 0, outliers * np.log(last_q), 0.0)

    sum1 = total * np.log(S[i]) + HL[i - 1] + last * np.log(last)
    sum2 = total * np.log(total) + level_term.sum(axis=1) + outlier_term
    return (sum1 - sum2) / total


def kl_threshold(hist: np.ndarray, bin_width: float, bits: int = 8) -> float:
    """Vectorised `paddle...cal_kl_threshold`: same candidates, same KL, same tie-breaking.

    `hist` must start at 0 (bin j covers [j*w, (j+1)*w)), as `FixedPostTrainingQuantization`
    builds it. Returns (best index + 0.5) * bin_width like upstream.
    """
    h = np.asarray(hist)
    if h.ndim != 1 or h.shape[0] < 2:
        raise ValueError(f"kl_threshold needs a 1-D histogram of >= 2 bins, got shape {h.shape}")
    candidates = _kl_candidates(h)
    if candidates.size:
        kl = kl_divergences(h, candidates, bits)
        # argmin keeps the first of equal minima, like upstream's strict '<'
        best = int(candidates[int(np.argmin(kl))])
    else:
        # upstream's fallback when every candidate was skipped: the last non-empty bin at or
        # below the starting index
        best = int((h.shape[0] - 1) * 0.5)
        while best > 0 and h[best] == 0:
            best -= 1
    return float((best + 0.5) * bin_width)


# --------------------------------------------------------------------------------------------
# mse / emd: upstream's threshold search, vectorised over its candidates
# --------------------------------------------------------------------------------------------

SEARCH_EXACT = 1 << 12  # tensors up to this size are searched element by element, as upstream
SEARCH_BINS = 1 << 14  # larger ones through a histogram of this many bins (see search_losses)
EMD_BINS = 1 << 16  # 'emd' compares moments: finer bins, with exact per-bin sums


def search_candidates() -> List[float]:
    """Upstream's candidate fractions of the batch abs-max: 0.3, 0.32, ... below 1.0 (35 of
    them), built by the same float accumulation so that every value matches exactly."""
    out, s = [], 0.3
    while s <= 1.0:
        out.append(s)
        s += 0.02
    return out


def _qdq(values: np.ndarray, scale, levels: int, onnx_format: bool) -> np.ndarray:
    if onnx_format:
        return np.clip(np.round(values / scale * levels), -levels - 1, levels) / levels * scale
    return np.round(np.clip(values, 0.0, scale) / scale * levels) / levels * scale


def _histogram_losses(count: np.ndarray, abs_max: float, loss: str, levels: int,
                      onnx_format: bool, total: Optional[np.ndarray] = None,
                      sum_xx: Optional[float] = None) -> np.ndarray:
    """mse / emd of every candidate from a histogram of the values over [-abs_max, abs_max].

    Each bin's values are taken at one value: their mean when the per-bin sums `total` (and
    the exact `sum_xx`) are given, else the bin centre (sum_xx then from the centres plus the
    within-bin variance w^2/12 of a bin of width w). A candidate's grid sends whole runs of
    bins to one level, so per level the count and the sum are differences of prefix sums: the
    cost is per level (256), not per bin, for each of the 35 candidates."""
    bins = count.size
    width = 2.0 * abs_max / bins
    prefix_n = np.concatenate(([0], np.cumsum(count)))
    n = float(prefix_n[-1])
    if total is None:
        centres = -abs_max + (np.arange(bins) + 0.5) * width
        sum_bin = count * centres
        sum_xx = float(sum_bin @ centres) + n * width * width / 12
    else:
        sum_bin = total
    prefix_s = np.concatenate(([0.0], np.cumsum(sum_bin, dtype=np.float64)))

    def value(i):  # the value bin i's members are taken at
        if total is None:
            return -abs_max + (i + 0.5) * width
        return total[i] / np.maximum(count[i], 1)

    step = np.array(search_candidates()) * abs_max / levels  # (candidates,)
    if onnx_format:  # symmetric signed grid: round(x / step) clipped to [-levels - 1, levels]
        q_levels = np.arange(-levels - 1, levels + 1)
    else:  # upstream's legacy grid: x clipped to [0, scale] first
        q_levels = np.arange(0, levels + 1)
    # A bin belongs to level k when its value lies below the boundary (k + 0.5) * step: the
    # bins wholly below a boundary, plus the bin it falls in if that bin's value is below it.
    boundaries = (q_levels[:-1] + 0.5)[None, :] * step[:, None]
    inside = np.clip(np.floor((boundaries + abs_max) / width), 0, bins - 1).astype(np.int64)
    below = inside + (value(inside) < boundaries)
    below[boundaries <= -abs_max] = 0
    below[boundaries >= abs_max] = bins
    edges = np.concatenate([np.zeros((len(step), 1), np.int64), below,
                            np.full((len(step), 1), bins, np.int64)], axis=1)
    counts, sums = np.diff(prefix_n[edges], axis=1), np.diff(prefix_s[edges], axis=1)
    q = q_levels[None, :] * step[:, None]  # (candidates, levels)
    sum_q, sum_qq = (q * counts).sum(axis=1), (q * q * counts).sum(axis=1)
    if loss == "mse":
        return np.maximum(sum_xx - 2 * (q * sums).sum(axis=1) + sum_qq, 0.0) / n
    mean_x, mean_q = float(prefix_s[-1]) / n, sum_q / n
    std_x = np.sqrt(max(sum_xx / n - mean_x ** 2, 0.0))
    std_q = np.sqrt(np.maximum(sum_qq / n - mean_q ** 2, 0.0))
    return np.abs(mean_x - mean_q) + np.abs(std_x - std_q)


def search_losses(x: np.ndarray, abs_max: float, loss: str, bits: int = 8,
                  onnx_format: bool = True) -> np.ndarray:
    """Upstream's 'mse' or 'emd' loss of every candidate scale for one batch tensor.

    Up to SEARCH_EXACT elements: paddle's `_sample_mse` / `_sample_emd` arithmetic (float32,
    element by element), all candidates at once (one row each). Larger tensors: upstream makes
    35 full passes (minutes for a YOLO model: ~76 M values per batch on yolov5n); here one pass
    bins the values into SEARCH_BINS bins over [-abs_max, abs_max] and `_histogram_losses`
    scores every candidate from the histogram. Only values in a bin that straddles a rounding
    boundary can be scored on the wrong side; on yolov5n's 376 observed tensors (3 batches)
    the 'mse' threshold equalled the element-by-element one for 375 and was one candidate step
    away for the last (tests check a step on heavy-tailed tensors)."""
    levels = 2 ** (bits - 1) - 1
    flat = np.asarray(x).reshape(-1)
    if flat.size <= SEARCH_EXACT:
        rows = [_qdq(flat, f * abs_max, levels, onnx_format) for f in search_candidates()]
        qdq = np.stack(rows)
        if loss == "mse":
            return ((flat - qdq) ** 2).mean(axis=1).astype(np.float64)
        return (np.abs(np.mean(flat) - qdq.mean(axis=1))
                + np.abs(np.std(flat) - qdq.std(axis=1))).astype(np.float64)
    # bin index of x: (x + abs_max) / width, as one multiply-add; intp because bincount
    # converts anything else to it first. +abs_max itself (and float32 rounding just above
    # it) lands at SEARCH_BINS or one more: folded into the last bin.
    bins = SEARCH_BINS if loss == "mse" else EMD_BINS
    index = flat * np.float32(bins / (2 * abs_max))
    index += np.float32(bins / 2)
    index = index.astype(np.intp)
    count = np.bincount(index, minlength=bins + 2)
    count[bins - 1] += count[bins:].sum()
    if loss == "mse":
        return _histogram_losses(count[:bins], abs_max, loss, levels, onnx_format)
    # emd compares the first two moments, where the mean difference is tiny: exact per-bin
    # sums and sum of squares, finer bins
    flat64 = flat.astype(np.float64)
    total = np.bincount(index, weights=flat64, minlength=bins + 2)
    total[bins - 1] += total[bins:].sum()
    return _histogram_losses(count[:bins], abs_max, loss, levels, onnx_format,
                             total[:bins], float(flat64 @ flat64))


def ptf_threshold(x: np.ndarray, bits: int = 8) -> float:
    """Upstream's 'ptf' rule for one batch tensor: of the thresholds abs_max / 2^k, k = 0..3,
    the one whose grid (values clipped to [0, threshold], as upstream) has the lowest squared
    error. Upstream computes in float32; so does this."""
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    abs_max = float(np.max(np.abs(flat)))
    if abs_max == 0.0:  # upstream divides by zero here; a small threshold as for mse / emd
        return 1e-8
    q_max = 2 ** (bits - 1) - 1
    scale1 = abs_max / q_max / 8
    losses = []
    for factor in (1, 2, 4, 8):
        scale = scale1 * factor
        qdq = np.clip(np.round(flat / scale), 0, q_max) * scale
        losses.append(float(((flat - qdq) ** 2).mean()))
    return q_max * scale1 * 2 ** losses.index(min(losses))
