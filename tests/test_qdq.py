import glob

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant import assets
from yoloquant.errors import ModelError
from yoloquant.qdq import (ConvQuantParams, abs_max_params, conv_abs_max, final_convs, insert_qdq,
                           ort_int8_report)

ort = pytest.importorskip("onnxruntime")


def small_model(seed=0):
    """X -> convA -> SiLU -> t;  t -> convB -> SiLU -> b;  t -> convC -> SiLU -> c;
    Concat(b, c) -> convD (a 1x1 "head" conv) -> Y.  t feeds two convs (shared input)."""
    rng = np.random.default_rng(seed)

    def conv(name, cin, cout, k, x, y):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32), f"{name}_W")
        b = numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{name}_B")
        node = helper.make_node("Conv", [x, f"{name}_W", f"{name}_B"], [y], name=name, pads=[k // 2] * 4)
        return node, [w, b]

    def silu(name, x, y):
        return [helper.make_node("Sigmoid", [x], [f"{name}_sig"], name=f"{name}_Sigmoid"),
                helper.make_node("Mul", [x, f"{name}_sig"], [y], name=f"{name}_Mul")]

    a, ia = conv("convA", 3, 16, 3, "X", "a")
    b, ib = conv("convB", 16, 8, 1, "t", "b_raw")
    c, ic = conv("convC", 16, 8, 3, "t", "c_raw")
    d, id_ = conv("convD", 16, 6, 1, "bc", "Y")
    nodes = [a, *silu("actA", "a", "t"), b, *silu("actB", "b_raw", "b"), c, *silu("actC", "c_raw", "c"),
             helper.make_node("Concat", ["b", "c"], ["bc"], name="concat", axis=1), d]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 6, 16, 16])],
        initializer=ia + ib + ic + id_)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})


def ops(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.fixture(scope="module")
def calibrated():
    model = small_model()
    rng = np.random.default_rng(1)
    batches = [{"X": rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(4)]
    return model, batches, abs_max_params(model, batches)


def test_inserted_nodes_shared_pair_and_float_agreement(calibrated):
    model, batches, params = calibrated
    q = insert_qdq(model, params, quantize_silu=False)  # the Conv-only arrangement
    onnx.checker.check_model(q, full_check=True)
    # Activation pairs: X, t (shared by convB and convC), bc; output pairs: convA-C (convD is the
    # head: float output by default); weights and biases: one DQ each for the 4 convs.
    assert len(ops(q, "QuantizeLinear")) == 3 + 3
    assert len(ops(q, "DequantizeLinear")) == 3 + 3 + 4 + 4
    assert len([n for n in ops(q, "QuantizeLinear") if n.input[0] == "t"]) == 1
    conv_inputs = {n.name: n.input[0] for n in ops(q, "Conv")}
    assert conv_inputs["convB"] == conv_inputs["convC"] != "t"
    # Untouched: non-conv ops and the graph output keep their tensors.
    assert [o.name for o in q.graph.output] == ["Y"]
    assert {n.name for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")} == \
        {n.name for n in model.graph.node}
    assert all(n.input[0] == "X" for n in ops(q, "QuantizeLinear") if "X" in n.input)
    zp = [init(q, n.input[2]) for n in ops(q, "QuantizeLinear")]
    assert all(z.dtype == np.uint8 and z == 128 for z in zp)

    x = batches[0]["X"]
    ref, got = run(model, x)[0], run(q, x)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05

    # Requantizing the head output too: one more pair, and the Conv that produced the graph output
    # now feeds a Q whose DQ keeps the output name.
    q_all = insert_qdq(model, params, float_head_outputs=False, quantize_silu=False)
    onnx.checker.check_model(q_all)
    assert len(ops(q_all, "QuantizeLinear")) == 7 and len(ops(q_all, "DequantizeLinear")) == 15
    assert [n for n in q_all.graph.node if "Y" in n.output][0].op_type == "DequantizeLinear"
    got_all = run(q_all, x)[0]
    assert np.linalg.norm(got_all - ref) / np.linalg.norm(ref) < 0.05


def test_weights_are_rounded_and_clipped_and_bias_is_int32(calibrated):
    model, _, params = calibrated
    # A threshold below the weight's abs-max clips; a single value means per-tensor.
    p_a = params[0]
    clipped = ConvQuantParams("convA", p_a.input_threshold, p_a.weight_thresholds * 0.5, output_threshold=p_a.output_threshold)
    per_tensor = ConvQuantParams("convB", params[1].input_threshold, np.array([0.4]), output_threshold=1.0)
    q = insert_qdq(model, [clipped, per_tensor, params[2]])
    dqs = {n.output[0]: n for n in ops(q, "DequantizeLinear")}
    convs = {n.name: n for n in ops(q, "Conv")}

    w = init(model, "convA_W")
    dq = dqs[convs["convA"].input[1]]
    scale = (clipped.weight_thresholds / 127).astype(np.float32)
    expect = np.clip(np.round(w / scale.reshape(-1, 1, 1, 1)), -127, 127)
    got = init(q, dq.input[0])
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expect)
    assert (np.abs(got) == 127).any()  # the halved threshold really clips
    np.testing.assert_allclose(init(q, dq.input[1]), scale)
    assert [a.i for a in dq.attribute if a.name == "axis"] == [0]

    dq_b = dqs[convs["convB"].input[1]]
    assert init(q, dq_b.input[1]).shape == ()  # per-tensor
    assert not [a for a in dq_b.attribute if a.name == "axis"]
    np.testing.assert_array_equal(init(q, dq_b.input[0]),
                                  np.clip(np.round(init(model, "convB_W") / np.float32(0.4 / 127)), -127, 127))

    bias_dq = dqs[convs["convA"].input[2]]
    q_bias = init(q, bias_dq.input[0])
    assert q_bias.dtype == np.int32
    s_in = np.float32(p_a.input_threshold / 127)
    np.testing.assert_allclose(init(q, bias_dq.input[1]), s_in * scale, rtol=1e-6)
    np.testing.assert_array_equal(q_bias, np.round(init(model, "convA_B") / (s_in * scale)))
    # The float weights/biases of quantized convs are gone from the file.
    names = {i.name for i in q.graph.initializer}
    assert not names & {"convA_W", "convA_B", "convB_W", "convC_W"}
    assert {"convD_W", "convD_B"} <= names  # convD was not listed: untouched


def test_given_quantized_weight_is_used_verbatim(calibrated):
    model, _, params = calibrated
    p = params[2]
    rng = np.random.default_rng(5)
    chosen = rng.integers(-127, 128, size=init(model, "convC_W").shape).astype(np.int8)
    q = insert_qdq(model, [ConvQuantParams("convC", p.input_threshold, p.weight_thresholds, chosen, p.output_threshold)])
    conv = [n for n in ops(q, "Conv") if n.name == "convC"][0]
    dq = next(n for n in ops(q, "DequantizeLinear") if n.output[0] == conv.input[1])
    np.testing.assert_array_equal(init(q, dq.input[0]), chosen)


def test_ort_runs_the_convs_in_int8(calibrated):
    """The QDQ model's convolutions become int8 kernels after ORT's graph optimisation, not float
    convs wrapped in Q/DQ."""
    model, _, params = calibrated
    report = ort_int8_report(insert_qdq(model, params))
    assert report["conv_total"] == 4
    assert report["conv_int8"] == 3, report["op_counts"]
    assert report["float_conv_names"] == ["convD"]  # the head conv keeps a float output
    assert ort_int8_report(insert_qdq(model, params, float_head_outputs=False))["conv_int8"] == 4

    # Without output thresholds the convs cannot fuse, and int8 activations don't fuse on x86.
    no_out = [ConvQuantParams(p.node_name, p.input_threshold, p.weight_thresholds) for p in params]
    assert ort_int8_report(insert_qdq(model, no_out))["conv_int8"] == 0
    assert ort_int8_report(insert_qdq(model, params, activation_type="int8"))["conv_int8"] == 0
    assert ort_int8_report(model)["conv_float"] == 4


def test_int8_activations_and_float_bias(calibrated):
    model, batches, params = calibrated
    q = insert_qdq(model, params, activation_type="int8", quantize_bias=False, quantize_silu=False)
    onnx.checker.check_model(q)
    zp = [init(q, n.input[2]) for n in ops(q, "QuantizeLinear")]
    assert all(z.dtype == np.int8 and z == 0 for z in zp)
    assert len(ops(q, "DequantizeLinear")) == 3 + 3 + 4  # no bias DQ
    assert {"convA_B", "convB_B", "convC_B", "convD_B"} <= {i.name for i in q.graph.initializer}
    ref, got = run(model, batches[0]["X"])[0], run(q, batches[0]["X"])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_default_quantizes_silu_between_int8_convs(calibrated):
    model, batches, params = calibrated
    q = insert_qdq(model, params)
    onnx.checker.check_model(q)
    # One more pair than the Conv-only arrangement: actA's Sigmoid output, on a fixed [0, 1] grid.
    assert len(ops(q, "QuantizeLinear")) == 7 and len(ops(q, "DequantizeLinear")) == 15
    sig_q = next(n for n in ops(q, "QuantizeLinear") if n.input[0].startswith("actA_sig"))
    assert init(q, sig_q.input[1]) == pytest.approx(1 / 255) and init(q, sig_q.input[2]) == 0
    report = ort_int8_report(q)
    assert report["conv_int8"] == 3
    # actA's output feeds convs -> 8-bit SiLU; actB/actC's outputs only feed Concat -> stay float.
    assert report["op_counts"].get("com.microsoft:QLinearSigmoid") == 1
    assert report["op_counts"].get("com.microsoft:QLinearMul") == 1
    ref, got = run(model, batches[0]["X"])[0], run(q, batches[0]["X"])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_conv_abs_max_matches_numpy(calibrated):
    model, batches, _ = calibrated
    stats = conv_abs_max(model, batches)
    assert list(stats) == ["convA", "convB", "convC", "convD"]
    assert stats["convA"][0] == pytest.approx(max(float(np.abs(b["X"]).max()) for b in batches))
    np.testing.assert_allclose(stats["convA"][2], np.abs(init(model, "convA_W")).reshape(16, -1).max(1))


def test_final_convs_and_asymmetric_output_range(calibrated):
    model, batches, params = calibrated
    assert final_convs(model) == {"convD"}
    p = params[1]
    lo, hi = -2.0, 6.0
    q = insert_qdq(model, [ConvQuantParams("convB", p.input_threshold, p.weight_thresholds, output_range=(lo, hi))])
    out_q = next(n for n in ops(q, "QuantizeLinear") if n.input[0].startswith("b_raw"))
    scale, zp = init(q, out_q.input[1]), init(q, out_q.input[2])
    assert scale == pytest.approx((hi - lo) / 255) and zp == round(2.0 / scale)
    assert ort_int8_report(q)["conv_int8"] == 1
    with pytest.raises(ModelError, match="low <= 0 <= high"):
        ConvQuantParams("convB", 1.0, np.ones(8), output_range=(0.5, 6.0))
    with pytest.raises(ModelError, match="not both"):
        ConvQuantParams("convB", 1.0, np.ones(8), output_threshold=1.0, output_range=(-1.0, 1.0))


@pytest.mark.parametrize("name, message", [
    ("conv_A", "'conv_A' is not a node of the graph; did you mean 'convA'"),
    ("actA_Sigmoid", "'actA_Sigmoid' is not a Conv node (it is a Sigmoid)"),
])
def test_bad_node_names(calibrated, name, message):
    model, _, params = calibrated
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        insert_qdq(model, [ConvQuantParams(name, 1.0, np.ones(16))])


def test_bad_parameters(calibrated):
    model, _, params = calibrated
    with pytest.raises(ModelError, match="activation_type"):
        insert_qdq(model, params, activation_type="int4")
    with pytest.raises(ModelError, match="input_threshold"):
        ConvQuantParams("convA", 0.0, np.ones(16))
    with pytest.raises(ModelError, match="weight_thresholds has 5 values"):
        insert_qdq(model, [ConvQuantParams("convA", 1.0, np.ones(5))])
    with pytest.raises(ModelError, match="listed twice"):
        insert_qdq(model, [params[0], params[0]])
    old = small_model()
    old.opset_import[0].version = 11
    with pytest.raises(ModelError, match="opset 11"):
        insert_qdq(old, params)


# ------------------------------------------------------------------ real model (optional assets)

def letterbox(path, size=640):
    import cv2

    im = cv2.imread(path)
    h, w = im.shape[:2]
    r = min(size / h, size / w)
    nh, nw = round(h * r), round(w * r)
    canvas = np.full((size, size, 3), 114, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = cv2.resize(im, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255


@pytest.mark.skipif(not assets.have_assets(), reason="real assets absent (set YOLOQUANT_ASSETS to run)")
def test_yolov5n_all_convs_int8_and_scores_close():
    images = sorted(glob.glob(str(assets.asset("coco/train2017_mini/images/*.jpg"))))
    if len(images) < 4:
        pytest.skip("COCO mini images absent from the assets")
    model = onnx.load(str(assets.asset("models/yolov5n.onnx")))
    feeds = [{"images": letterbox(p)} for p in images[:4]]
    q = insert_qdq(model, abs_max_params(model, feeds))
    onnx.checker.check_model(q)

    report = ort_int8_report(q)
    assert report["conv_total"] == 60
    # All but the three prediction convs of the head, whose outputs stay float by default.
    assert report["conv_int8"] == 57, report["float_conv_names"]
    assert sorted(report["float_conv_names"]) == ["/model.24/m.0/Conv", "/model.24/m.1/Conv", "/model.24/m.2/Conv"]
    assert ort_int8_report(insert_qdq(model, abs_max_params(model, feeds[:1]), float_head_outputs=False))["conv_int8"] == 60

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(q.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    f, g = ref.run(None, feeds[0])[0], got.run(None, feeds[0])[0]
    obj_f, obj_g = f[0, :, 4], g[0, :, 4]
    # Objectness over all 25200 anchors. Measured with this crude 4-image abs-max calibration:
    # mean 0.0019, max 0.24; on the 80 anchors with float objectness > 0.5, mean 0.038.
    assert np.abs(obj_g - obj_f).mean() < 0.005
    assert np.abs(obj_g - obj_f).max() < 0.4
    confident = obj_f > 0.5
    assert confident.sum() > 0
    assert np.abs(obj_g - obj_f)[confident].mean() < 0.08
