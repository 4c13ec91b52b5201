"""Pins the conv-only placement (yoloquant.qdq.insert_qdq) byte for byte.

The digests were computed with the single-module qdq.py (commit 1077f75) before it was split
into the yoloquant/qdq/ package: the refactor must write exactly the same graphs. Parameters are
fixed numbers (no calibration run), so the digests do not depend on the CPU's float kernels.
"""
import hashlib

import numpy as np
import pytest
from onnx import numpy_helper

from test_qdq import small_model
from yoloquant.qdq import ConvQuantParams, insert_qdq


def fixed_params(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w_max = {c: np.abs(inits[f"{c}_W"]).reshape(inits[f"{c}_W"].shape[0], -1).max(axis=1)
             for c in ("convA", "convB", "convC", "convD")}
    return [
        ConvQuantParams("convA", 0.99, w_max["convA"], output_range=(-1.5, 4.0)),
        ConvQuantParams("convB", 3.0, w_max["convB"], output_threshold=5.0),
        ConvQuantParams("convC", 3.0, w_max["convC"] * 0.9, output_threshold=6.0,
                        bias_shift=np.linspace(-0.1, 0.1, 8)),
        ConvQuantParams("convD", 2.5, np.array([w_max["convD"].max()]), output_threshold=9.0),
    ]


def digest(model):
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


PINNED = {
    "default": "d69888bf0092d1cc",
    "conv_only": "f19ad5838e8d01ce",
    "int8_float_bias": "8ea579a4bae54b06",
    "head_requantized": "55836b9dd21cdf8a",
}
VARIANTS = {
    "default": {},
    "conv_only": {"quantize_silu": False},
    "int8_float_bias": {"activation_type": "int8", "quantize_bias": False},
    "head_requantized": {"float_head_outputs": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_conv_only_placement_is_unchanged(variant):
    model = small_model()
    assert digest(insert_qdq(model, fixed_params(model), **VARIANTS[variant])) == PINNED[variant]
