"""Cross-layer equalization of the float ONNX model, before conversion and calibration.

``graph`` finds the conv pairs, ``measure`` measures ranges and errors, ``algorithm`` chooses
the scales, applies them and keeps only the pairs whose measured 8-bit error shrinks.
"""
from .algorithm import EQUALIZATIONS, EqualizationResult, equalize
from .graph import Pair, find_pairs

__all__ = ["EQUALIZATIONS", "EqualizationResult", "Pair", "equalize", "find_pairs"]
