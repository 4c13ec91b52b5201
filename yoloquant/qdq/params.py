"""What one quantized Conv is given (ConvQuantParams) and how its weights become int8."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ModelError

ACTIVATION_TYPES = {
    # name: (numpy type, zero point giving the symmetric int8 grid)
    "uint8": (np.uint8, 128),
    "int8": (np.int8, 0),
}
QMAX = 127  # symmetric int8 grid: scale = threshold / 127
MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13
INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class ConvQuantParams:
    """Calibrated quantization parameters of one Conv node.

    * ``input_threshold``: symmetric threshold T of the Conv's input activation (scale T/127).
    * ``weight_thresholds``: per output channel, shape (C_out,), or one value (per tensor);
      weight scale t/127.
    * ``quantized_weight``: int8 weight values already chosen by a rounding algorithm (e.g.
      AdaRound), same shape as the weight; used verbatim instead of round(w / scale).
    * ``output_threshold``: threshold of the Conv's raw output (before its activation). Needed
      for ONNX Runtime to run the Conv as an int8 kernel; without it the Conv gets Q/DQ on its
      inputs only and ORT runs it in float.
    * ``output_range``: (low, high), low <= 0 <= high, instead of ``output_threshold``: an
      asymmetric 8-bit grid (scale (high - low) / 255) for the Conv output. The output scale only
      exists for ORT (Paddle's int8 runtime does not requantize conv outputs), so it need not be
      symmetric; conv outputs followed by SiLU are mostly negative values that SiLU flattens.
    * ``bias_shift``: per output channel, added to the Conv's float bias before it is quantized
      (bias correction, see ``precision.layer_snr``); a Conv without bias gets one.
    """

    node_name: str
    input_threshold: float
    weight_thresholds: np.ndarray
    quantized_weight: Optional[np.ndarray] = None
    output_threshold: Optional[float] = None
    output_range: Optional[tuple] = None
    bias_shift: Optional[np.ndarray] = None

    def __post_init__(self):
        where = f"ConvQuantParams({self.node_name!r})"
        _check_threshold(self.input_threshold, f"{where}.input_threshold")
        if self.output_threshold is not None:
            _check_threshold(self.output_threshold, f"{where}.output_threshold")
        if self.output_range is not None:
            if self.output_threshold is not None:
                raise ModelError(f"{where}: give output_threshold or output_range, not both")
            try:
                lo, hi = (float(v) for v in self.output_range)
            except (TypeError, ValueError):
                raise ModelError(f"{where}.output_range must be (low, high), got {self.output_range!r}") from None
            # Zero must lie on the grid (ONNX zero points are integers), so the range spans 0.
            if not (np.isfinite(lo) and np.isfinite(hi) and lo <= 0 <= hi and hi > lo):
                raise ModelError(f"{where}.output_range must satisfy low <= 0 <= high, low < high, "
                                 f"got {self.output_range!r}")
            object.__setattr__(self, "output_range", (lo, hi))
        w_t = np.asarray(self.weight_thresholds, dtype=np.float64).reshape(-1)
        if w_t.size == 0 or not np.all(np.isfinite(w_t)) or np.any(w_t < 0):
            raise ModelError(f"{where}.weight_thresholds must be finite and >= 0, got {self.weight_thresholds!r}")
        object.__setattr__(self, "weight_thresholds", w_t)
        if self.quantized_weight is not None:
            q = np.asarray(self.quantized_weight)
            if not np.array_equal(q, np.round(q)) or q.min(initial=0) < -128 or q.max(initial=0) > 127:
                raise ModelError(f"{where}.quantized_weight must hold integers in [-128, 127]")
            object.__setattr__(self, "quantized_weight", q.astype(np.int8))
        if self.bias_shift is not None:
            shift = np.asarray(self.bias_shift, dtype=np.float32).reshape(-1)
            if not np.all(np.isfinite(shift)):
                raise ModelError(f"{where}.bias_shift must be finite")
            object.__setattr__(self, "bias_shift", shift)


def _check_threshold(value, what: str) -> None:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and np.isfinite(value) and value > 0):
        raise ModelError(f"{what} must be a finite number > 0, got {value!r}")


def _scale(threshold: float) -> np.float32:
    return np.float32(threshold / QMAX)


def _quantize_weight(w: np.ndarray, p: ConvQuantParams):
    """int8 weight and its float32 scale (shape (C_out,) or scalar)."""
    c_out = w.shape[0]
    t = p.weight_thresholds
    if t.size not in (1, c_out):
        raise ModelError(f"Conv {p.node_name!r}: weight_thresholds has {t.size} values, the weight has "
                         f"{c_out} output channels (give {c_out} values or 1)")
    per_channel = t.size == c_out and t.size > 1
    dead = t <= 0
    # A zero threshold means "this channel quantizes to 0"; any positive scale then represents it,
    # and 1/127 keeps the int32 bias (bias / (s_in * s_w)) far from overflow.
    scale = np.where(dead, 1.0, t / QMAX).astype(np.float32)
    bshape = (-1,) + (1,) * (w.ndim - 1)
    if p.quantized_weight is not None:
        if p.quantized_weight.shape != w.shape:
            raise ModelError(f"Conv {p.node_name!r}: quantized_weight has shape {p.quantized_weight.shape}, "
                             f"the weight has {w.shape}")
        q = p.quantized_weight.astype(np.int8)
    else:
        # np.round = round half to even, as Paddle's quantizer does.
        q = np.clip(np.round(w.astype(np.float64) / scale.astype(np.float64).reshape(bshape)), -QMAX, QMAX)
        q = q.astype(np.int8)
    if dead.any():
        q = q.copy()
        q[np.broadcast_to(dead.reshape(bshape if per_channel else (1,) * w.ndim), q.shape)] = 0
    return q, (scale if per_channel else np.float32(scale[0])), per_channel
