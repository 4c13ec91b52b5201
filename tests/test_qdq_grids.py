"""Grids of the uint8 QDQ ONNX: asymmetric conv inputs (rules.asymmetric_inputs) and prediction
convs read by a Sigmoid running in int8 (rules.int8_head_outputs), checked against the float
model on ONNX Runtime."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant.head import activation_after
from yoloquant.precision import layer_snr, output_grid, sigmoid_clip
from yoloquant.qdq import ConvQuantParams, ort_int8_report, place_qdq, rules_for
from yoloquant.qdq.graph import read_only_by_sigmoid, tensor_readers
from yoloquant.qdq.placement import input_grid

from test_qdq_placement import GraphBuilder, calibrated, glue_model, images, q_grid, run, snr_db

ort = pytest.importorskip("onnxruntime")

SILU_MIN = -0.2785  # min of x * sigmoid(x)


def test_input_grid_spans_the_measured_low_end_and_keeps_zero_exact():
    scale, zp = input_grid(4.0, SILU_MIN)
    assert scale == pytest.approx((4.0 - SILU_MIN) / 255, rel=1e-6)
    assert zp == round(-SILU_MIN / scale) == 17
    assert abs(-zp * scale - SILU_MIN) <= scale / 2  # the lowest code is the SiLU minimum
    assert input_grid(4.0, None) == (np.float32(4.0 / 127), 128)  # unknown low: [-T, T] as before
    assert input_grid(4.0, -9.0) == (np.float32(4.0 / 127), 128)  # reaching -T: the same
    assert input_grid(4.0, 0.5) == (np.float32(4.0 / 255), 0)  # all positive: [0, T]


def _output_snr(model, q, imgs):
    return float(np.mean([snr_db(run(model, x[None]), run(q, x[None])) for x in imgs]))


def test_asymmetric_inputs_use_the_codes_silu_leaves_unused():
    model, imgs = glue_model(), images()
    params, ranges = calibrated(model, imgs)
    grids = {"X": (np.float32(1 / 255), 0)}
    asym, _ = place_qdq(model, params, ranges, rules=rules_for("onnxruntime"), input_grids=grids)
    sym, _ = place_qdq(model, params, ranges, rules=rules_for("onnxruntime", asymmetric_inputs=False),
                       input_grids=grids)
    # convB reads SiLU output 'a': its grid starts at the SiLU minimum, not at -T
    scale, zp = q_grid(asym, "a")
    lo = ranges["a"][0]
    assert q_grid(sym, "a")[1] == 128
    assert SILU_MIN - 1e-3 < lo < 0 and zp == round(-lo / scale) < 40
    # finer grids, same int8 kernels: the output moves closer to float (measured +1.9 dB here, AMD EPYC 25/17)
    assert ort_int8_report(asym)["conv_int8"] == ort_int8_report(sym)["conv_int8"]
    assert _output_snr(model, asym, imgs) > _output_snr(model, sym, imgs) + 0.8


def test_layer_snr_judges_the_deployed_asymmetric_grid():
    model, imgs = glue_model(), images()
    params, ranges = calibrated(model, imgs)
    b = [ConvQuantParams(p.node_name, p.input_threshold, p.weight_thresholds)
         for p in params if p.node_name == "convB"]
    sym = layer_snr(model, b, imgs, "X")["convB"].snr_db
    asym = layer_snr(model, b, imgs, "X", input_lows={t: lo for t, (lo, _) in ranges.items()})["convB"].snr_db
    assert asym > sym + 2.0, (sym, asym)  # half the step: measured +3.8 dB


def sigmoid_head_model(extra_reader=False, seed=3):
    """X -> conv1 -> SiLU -> conv2 (prediction conv, 12 = 3 anchors x 4) -> Reshape -> Transpose
    -> Sigmoid -> Y, as yolov5's Detect exports; ``extra_reader``: the raw logits are an output too."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((12, 16, 1, 1)) * 1.2).astype(np.float32)
    b2 = (rng.standard_normal(12) * 2 - 3).astype(np.float32)  # mostly negative logits, like scores
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.zeros(16, np.float32), "B1"),
             numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2"),
             numpy_helper.from_array(np.array([1, 3, 4, 32, 32], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["h_raw"], name="conv1", pads=[1] * 4),
             helper.make_node("Sigmoid", ["h_raw"], ["h_sig"], name="act_sig"),
             helper.make_node("Mul", ["h_raw", "h_sig"], ["h"], name="act_mul"),
             helper.make_node("Conv", ["h", "W2", "B2"], ["p"], name="conv2"),
             helper.make_node("Reshape", ["p", "shape"], ["p5"], name="view"),
             helper.make_node("Transpose", ["p5"], ["pt"], name="permute", perm=[0, 1, 3, 4, 2]),
             helper.make_node("Sigmoid", ["pt"], ["Y"], name="decode_sigmoid")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 32, 32, 4])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 12, 32, 32]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 32, 32])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_sigmoid_clip_stops_where_the_sigmoid_is_below_its_rounding_error():
    low = sigmoid_clip(-20.0, 8.0)
    step = (8.0 - low) / 255
    assert -6.0 < low < -4.0
    assert 1 / (1 + np.exp(-low)) <= step / 8  # what is clipped off is below the rounding error
    assert sigmoid_clip(-2.0, 8.0) == -2.0  # nothing to clip


def test_prediction_conv_read_by_a_sigmoid_runs_in_int8():
    model, imgs = sigmoid_head_model(), images()
    readers = tensor_readers(model.graph)
    assert read_only_by_sigmoid("p", readers) and activation_after(model, "conv2") == "Sigmoid"
    assert not read_only_by_sigmoid("p", tensor_readers(sigmoid_head_model(extra_reader=True).graph), {"p"})
    params, ranges = calibrated(model, imgs)
    lo, hi = ranges["p"]
    grid = output_grid(model, "conv2", lo, hi)["output_range"]
    assert lo < grid[0] < 0 and grid[1] == hi  # the logits' low tail is clipped
    params = [ConvQuantParams(p.node_name, p.input_threshold, p.weight_thresholds,
                              output_range=grid if p.node_name == "conv2" else p.output_range)
              for p in params]
    grids = {"X": (np.float32(1 / 255), 0)}
    q, report = place_qdq(model, params, ranges, rules=rules_for("onnxruntime"), input_grids=grids)
    kept, report_f = place_qdq(model, params, ranges, rules=rules_for("onnxruntime", int8_head_outputs=False),
                               input_grids=grids)
    assert report.float_by_rule == ["conv1"] and report_f.float_by_rule == ["conv1", "conv2"]
    assert ort_int8_report(q)["conv_int8"] == 1 and ort_int8_report(kept)["conv_int8"] == 0
    # the scores after the sigmoid stay close to float (measured 36.6 dB here)
    assert _output_snr(model, q, imgs) > 30.0


def se_model(seed=0):
    """X -> convA -> SiLU -> convB -> b;  squeeze-excite: b -> GlobalAveragePool -> convS ->
    Sigmoid -> s;  b * s -> convC -> SiLU -> convD -> Y (YOLOv6-Lite's depthwise conv -> SE)."""
    g = GraphBuilder(seed)
    g.conv("convA", 3, 8, 3, "X", "a_raw")
    g.silu("actA", "a_raw", "a")
    g.conv("convB", 8, 8, 3, "a", "b")
    g.node("GlobalAveragePool", ["b"], ["pooled"], "squeeze")
    g.conv("convS", 8, 8, 1, "pooled", "s_raw")
    g.node("Sigmoid", ["s_raw"], ["s"], "gate")
    g.node("Mul", ["b", "s"], ["m"], "excite")
    g.conv("convC", 8, 8, 1, "m", "c_raw")
    g.silu("actC", "c_raw", "c")
    g.conv("convD", 8, 4, 1, "c", "Y")
    return g.model("se", [1, 3, 32, 32], [1, 4, 32, 32])


def test_se_squeeze_reading_the_rounded_tensor_lets_ort_fuse_its_producer():
    """convS (the SE conv) kept float: by default its whole input path stays float, back through
    the pool to convB's output, which the excite Mul reads in int8 too, so ORT runs convB float.
    With pool_reads_rounded the pool averages the dequantized tensor and convB is a QLinearConv;
    the output stays within 20 dB of float (measured: 35.3 dB either way)."""
    model = se_model()
    imgs = images()
    params, ranges = calibrated(model, imgs)
    params = [p for p in params if p.node_name != "convS"]
    x = imgs[0][None]
    ref = run(model, x)
    out = {}
    for flag in (False, True):
        q, _ = place_qdq(model, params, ranges, rules=rules_for("onnxruntime", pool_reads_rounded=flag))
        report = ort_int8_report(q)
        out[flag] = (report["conv_int8"], "convB" in report["float_conv_names"], snr_db(ref, run(q, x)))
    assert out[False][:2] == (1, True) and out[True][:2] == (2, False), out
    assert out[True][2] > 20 and out[False][2] > 20, out
