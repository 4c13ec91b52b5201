"""bench/speed.py pieces on tiny graphs (the benchmark itself needs the real assets and minutes)."""
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from yoloquant.qdq import abs_max_params, insert_qdq, ort_int8_report

ort = pytest.importorskip("onnxruntime")
BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def speed():
    saved = dict(os.environ)  # the module sets KMP_BLOCKTIME etc. for its own process only
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("speed")
    finally:
        sys.path.remove(str(BENCH))
        os.environ.clear()
        os.environ.update(saved)


def tiny_model(seed=0):
    """X -> convA -> SiLU -> convB -> SiLU -> convH (head) -> Sigmoid -> Reshape -> Y."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(name, cin, cout, x, y):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((cout, cin, 3, 3)) * 0.3).astype(np.float32), f"{name}_W"))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32),
                                             f"{name}_B"))
        nodes.append(helper.make_node("Conv", [x, f"{name}_W", f"{name}_B"], [y], name=name,
                                      pads=[1, 1, 1, 1]))

    def silu(name, x, y):
        nodes.append(helper.make_node("Sigmoid", [x], [f"{name}_s"], name=f"{name}_Sigmoid"))
        nodes.append(helper.make_node("Mul", [x, f"{name}_s"], [y], name=f"{name}_Mul"))

    conv("convA", 3, 8, "X", "a")
    silu("actA", "a", "a2")
    conv("convB", 8, 8, "a2", "b")
    silu("actB", "b", "b2")
    conv("convH", 8, 4, "b2", "h")
    nodes.append(helper.make_node("Sigmoid", ["h"], ["hs"], name="head_Sigmoid"))
    inits.append(numpy_helper.from_array(np.array([1, 4, -1], dtype=np.int64), "shape"))
    nodes.append(helper.make_node("Reshape", ["hs", "shape"], ["Y"], name="head_Reshape"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 4, 256])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feeds(n=4):
    rng = np.random.default_rng(1)
    return [{"X": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(n)]


def test_head_nodes_are_the_final_convs_and_everything_after_them(speed):
    assert speed.head_nodes(tiny_model()) == ["convH", "head_Reshape", "head_Sigmoid"]


def test_inputs_only_keeps_conv_input_qdq_and_drops_conv_output_qdq(speed, tmp_path):
    from experiments.qdq_variants import inputs_only

    model = tiny_model()
    qdq = insert_qdq(model, abs_max_params(model, feeds(), skip_output=["convH"]))
    assert ort_int8_report(qdq)["conv_int8"] == 2  # ORT fuses convA and convB
    variant = inputs_only(qdq)
    producer = {o: n for n in variant.graph.node for o in n.output}
    q_inputs = [producer[n.input[0]].op_type if n.input[0] in producer else "input"
                for n in variant.graph.node if n.op_type == "QuantizeLinear"]
    assert "Conv" not in q_inputs and "Sigmoid" not in q_inputs
    assert q_inputs.count("Mul") == 2 and q_inputs.count("input") == 1  # conv inputs stay
    # still a valid model computing nearly the same thing as the float one
    path = tmp_path / "v.onnx"
    onnx.save(variant, str(path))
    x = feeds(1)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = speed.OrtBackend(path, threads=1)(x["X"])
    np.testing.assert_allclose(got, ref.run(None, x)[0], atol=0.05)


def test_our_activation_scales_skips_raw_conv_outputs(speed):
    model = tiny_model()
    qdq = insert_qdq(model, abs_max_params(model, feeds(), skip_output=["convH"]))
    scales = speed.our_activation_scales(qdq)
    assert set(scales) >= {"X", "a2", "b2"}
    assert not any(t.endswith("_float") for t in scales)
    assert all(int(zp) == 128 for _, zp in scales.values())  # uint8, symmetric grid


def test_interleaved_timing_records_every_candidate_every_round(speed):
    calls = []

    def fake(name):
        return lambda x: calls.append(name)

    cands = []
    for name in "abc":
        c = speed.Candidate(speed.Artifact(name, "fp32"), "rt", None)
        c.backend = fake(name)
        cands.append(c)
    broken = speed.Candidate(speed.Artifact("d", "int8"), "rt", None)  # failed to load: skipped
    speed.time_interleaved(cands + [broken], np.zeros(1), rounds=7, warmup=2)
    assert [len(c.times) for c in cands] == [7, 7, 7] and not broken.times
    assert len(calls) == 27
    rounds = [calls[i:i + 3] for i in range(0, 27, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round runs each once
    assert len({tuple(r) for r in rounds}) > 1  # in a shuffled order


def test_stats_and_markdown(speed):
    s = speed.stats([3.0, 1.0, 2.0, 10.0], [2.0, 2.0, 4.0, 4.0])
    assert s["median_ms"] == 2.5 and s["cpu_median_ms"] == 3.0 and s["runs"] == 4
    row = {"artifact": "FP32", "precision": "fp32", "runtime": "onnxruntime", "quant_seconds": None,
           "int8_convs": "0/3", "metrics": {"map50_95": 0.3, "map50": 0.5, "images": 2},
           "error": None, **s, "ratio_to_fastest_fp32": 1.0, "cpu_ratio_to_fastest_fp32": 1.0}
    bad = {**row, "artifact": "INT8 x", "precision": "int8", "runtime": "openvino", "metrics": None,
           "error": "RuntimeError: no", "quant_seconds": 12.0}
    for k in ("median_ms", "p10_ms", "p90_ms", "cpu_median_ms", "ratio_to_fastest_fp32"):
        bad.pop(k)
    result = {"config": "c.yaml", "model": "/m/x.onnx", "threads": 2, "rounds": 4, "warmup": 1,
              "load_average": (1.0, 1.0, 1.0), "calibration": {"images": 32},
              "machine": {"cpu": "cpu", "cores": 2}, "versions": {"onnx": "1"},
              "fastest_fp32": {"runtime": "onnxruntime", "median_ms": 2.5}, "rows": [row, bad]}
    int8 = {**row, "artifact": "INT8 y", "precision": "int8", "map_delta_points": -1.0,
            "map_delta_ci95_points": [-2.0, 0.5], "metrics": {"map50_95": 0.29, "map50": 0.5, "images": 2}}
    result["rows"].append(int8)
    text = speed.markdown(result)
    assert "| FP32 | onnxruntime | 2.5 | 1.3-7.9 | 1.00 | 3.0 | 1.00 | 0.3000 | - | - | 0/3 | - |" in text
    assert "| 0.2900 (-1.00 [-2.00, +0.50]) |" in text and "paired bootstrap over images" in text
    assert "| INT8 x | openvino | failed |" in text and "RuntimeError: no" in text
    # held-out mAP, kernel counts and the per-op profile when the run has them
    row.update(heldout={"map50_95": 0.31, "map50": 0.5, "images": 134},
               kernels={"int8": 40, "float": 3, "qdq": 2, "layout": 5},
               profile_ms={"QLinearConv": 10.0, "Conv": 2.5})
    result["heldout_images"] = 134
    text = speed.markdown(result)
    assert "| 0.3000 | 0.3100 | - | 0/3 | 40 / 3 |" in text and "134 held-out train images" in text
    assert "* FP32 on onnxruntime: 12.5 ms: QLinearConv 10.0, Conv 2.5" in text


def test_ort_kernel_counts_follow_the_codes(speed):
    from profiles import ort_kernels

    from yoloquant.qdq.check import _session

    model = tiny_model()
    qdq = insert_qdq(model, abs_max_params(model, feeds(), skip_output=["convH"]))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        _session(qdq, optimized_path=f"{tmp}/o.onnx")
        k = ort_kernels(onnx.load(f"{tmp}/o.onnx"))
        _session(model, optimized_path=f"{tmp}/f.onnx")
        k_fp32 = ort_kernels(onnx.load(f"{tmp}/f.onnx"))
    assert k_fp32["int8"] == 0 and k_fp32["float"] >= 3
    # on codes: QLinearConv x2 and the two SiLUs (QLinearSigmoid + QLinearMul); float: the head
    # conv with its Sigmoid fused (FusedConv); Q/DQ and Transposes/Reshape counted apart
    assert (k["int8"], k["float"], k["qdq"], k["layout"]) == (6, 1, 4, 3), k
