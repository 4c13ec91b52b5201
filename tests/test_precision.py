"""precision.py (which convs stay float, by measured 8-bit SNR) and head.py (the detection head
read from graph structure)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant.head import activation_after, conv_producers, regression_convs
from yoloquant.precision import (LayerSNR, apply_float_budget, choose_float_convs, layer_snr,
                                 output_grid, silu_clip)
from yoloquant.qdq import QMAX, ConvQuantParams

pytest.importorskip("onnxruntime")


def two_conv_model():
    """X (2 channels) -> depthwise 1x1 'dw' (weights 1, 1) -> Y1;  X -> 1x1 'pw' (2 -> 1) -> Y2.
    Channel 0 of X spans ~100, channel 1 ~0.1: one per-tensor grid cannot serve both. The graph
    outputs are Sigmoid(Y1), Sigmoid(Y2): scores, so neither conv counts as a regression conv."""
    w_dw = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w_dw")
    w_pw = numpy_helper.from_array(np.array([[[[1.0]], [[0.0]]]], np.float32), "w_pw")
    nodes = [helper.make_node("Conv", ["X", "w_dw"], ["Y1"], name="dw", group=2),
             helper.make_node("Conv", ["X", "w_pw"], ["Y2"], name="pw"),
             helper.make_node("Sigmoid", ["Y1"], ["S1"], name="sig1"),
             helper.make_node("Sigmoid", ["Y2"], ["S2"], name="sig2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("S1", TensorProto.FLOAT, [1, 2, 8, 8]),
                               helper.make_tensor_value_info("S2", TensorProto.FLOAT, [1, 1, 8, 8])],
                              initializer=[w_dw, w_pw])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [np.stack([rng.random((8, 8)) * 100, rng.random((8, 8)) * 0.1]).astype(np.float32) for _ in range(n)]


def fake_quant(x, threshold):
    """uint8 grid with zero point 128, as the probe and insert_qdq use."""
    s = np.float32(threshold / QMAX)
    return ((np.clip(np.round(x / s) + 128, 0, 255) - 128) * s).astype(np.float64)


def test_layer_snr_matches_a_numpy_reference():
    model, imgs = two_conv_model(), images()
    t = max(float(np.abs(i).max()) for i in imgs)
    params = [ConvQuantParams("dw", t, np.array([1.0, 1.0])), ConvQuantParams("pw", t, np.array([1.0]))]
    snr = layer_snr(model, params, imgs, "X")
    x = np.stack(imgs).astype(np.float64)
    xq = fake_quant(x, t)
    # dw: per output channel (= per input channel here) error / variance, averaged, in dB
    nsr = [((xq[:, c] - x[:, c]) ** 2).mean() / x[:, c].var() for c in range(2)]
    assert snr["dw"].snr_db == pytest.approx(-10 * np.log10(np.mean(nsr)), abs=0.05)
    assert snr["dw"].worst_channel_db == pytest.approx(-10 * np.log10(max(nsr)), abs=0.05)
    assert snr["dw"].live_channels == 2
    # pw reads only the wide channel (weight 0 on the narrow one): fine in 8 bits
    nsr_pw = ((xq[:, 0] - x[:, 0]) ** 2).mean() / x[:, 0].var()
    assert snr["pw"].snr_db == pytest.approx(-10 * np.log10(nsr_pw), abs=0.05)
    assert snr["pw"].snr_db > 35 and snr["dw"].snr_db < 10


def test_choose_float_convs_keeps_the_coarse_depthwise_conv_float():
    model, imgs = two_conv_model(), images()
    t = max(float(np.abs(i).max()) for i in imgs)
    params = [ConvQuantParams("dw", t, np.array([1.0, 1.0])), ConvQuantParams("pw", t, np.array([1.0]))]
    reasons, snr = choose_float_convs(model, params, imgs, "X")
    assert set(reasons) == {"dw"} and "SNR" in reasons["dw"]
    assert set(snr) == {"dw", "pw"}
    # a dead output channel (no variance) carries nothing: it is not counted
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([1, 0], np.float32).reshape(2, 1, 1, 1),
                                                                "w_dw"))
    snr = layer_snr(model, params[:1], imgs, "X")
    assert snr["dw"].live_channels == 1 and snr["dw"].snr_db > 35


def test_choose_float_convs_then_a_budget_of_one_keeps_the_worse_of_two_low_snr_convs():
    model, imgs = two_conv_model(), images()
    t = max(float(np.abs(i).max()) for i in imgs)
    params = [ConvQuantParams("dw", t, np.array([1.0, 1.0])), ConvQuantParams("pw", t, np.array([1.0]))]
    # a threshold above both measured SNRs (dw < 10 dB, pw > 35 dB): both would stay float
    reasons, snr = choose_float_convs(model, params, imgs, "X", min_snr_db=60)
    assert set(reasons) == {"dw", "pw"}
    kept, over = apply_float_budget(reasons, snr, max_float=1)
    assert set(kept) == {"dw"} and set(over) == {"pw"}
    assert "over the float budget of 1" in over["pw"] and reasons["pw"] in over["pw"]
    assert apply_float_budget(reasons, snr, max_float=2) == (reasons, {})


def test_float_budget_counts_structural_reasons_first():
    snr = {n: LayerSNR(n, db, db - 3, 4) for n, db in (("a", 20.0), ("b", 5.0), ("c", 12.0))}
    reasons = {"reg": "regression prediction conv", **{n: f"8-bit SNR {s.snr_db}" for n, s in snr.items()}}
    kept, over = apply_float_budget(reasons, snr, max_float=2)
    assert list(kept) == ["reg", "b"] and set(over) == {"c", "a"}
    # no room left after the regression convs: every SNR conv runs int8, the regression one stays
    kept, over = apply_float_budget(reasons, snr, max_float=0)
    assert list(kept) == ["reg"] and set(over) == {"a", "b", "c"}


def test_layer_snr_errors():
    model = two_conv_model()
    with pytest.raises(Exception, match="not a Conv"):
        layer_snr(model, [ConvQuantParams("nope", 1.0, np.array([1.0]))], images(1), "X")
    with pytest.raises(Exception, match="at least one image"):
        layer_snr(model, [ConvQuantParams("dw", 1.0, np.array([1.0, 1.0]))], [], "X")


def test_silu_clip_bounds_the_clipping_error_by_half_a_step():
    for low, high in [(-30.0, 6.0), (-5.0, 50.0), (-100.0, 0.5)]:
        lo = silu_clip(low, high)
        assert low <= lo < -1.28
        step = (high - lo) / 255
        assert abs(lo / (1 + np.exp(-lo))) <= step / 2 + 1e-9
    assert silu_clip(-0.5, 6.0) == -0.5  # nothing to clip


def head_model():
    """X -> backbone conv 'b' (SiLU) -> MaxPool -> Concat(., X2) -> 'score' conv -> Sigmoid -> out
                                                                  -> 'reg' conv (raw)       -> out
                                                   'r' conv -> Relu -> Concat"""
    rng = np.random.default_rng(0)

    def w(name, cout, cin):
        return numpy_helper.from_array(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["X", "wb"], ["b"], name="b"),
             helper.make_node("Sigmoid", ["b"], ["b_sig"], name="b_sigmoid"),
             helper.make_node("Mul", ["b", "b_sig"], ["b_act"], name="b_mul"),
             helper.make_node("MaxPool", ["b_act"], ["p"], name="pool", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["X", "wr"], ["r"], name="r"),
             helper.make_node("Relu", ["r"], ["r_act"], name="r_relu"),
             helper.make_node("Concat", ["p", "r_act"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "ws"], ["s"], name="score"),
             helper.make_node("Sigmoid", ["s"], ["s_sig"], name="s_sigmoid"),
             helper.make_node("Conv", ["cat", "wg"], ["g"], name="reg"),
             helper.make_node("Concat", ["g", "s_sig"], ["out"], name="out_cat", axis=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, 4, 4])],
                              initializer=[w("wb", 4, 3), w("wr", 4, 3), w("ws", 1, 8), w("wg", 4, 8)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_head_structure():
    model = head_model()
    onnx.checker.check_model(model)
    assert regression_convs(model) == {"reg"}  # 'score' reaches the output only through Sigmoid
    assert conv_producers(model, ["score"]) == {"b", "r"}  # through MaxPool, activations, Concat
    assert conv_producers(model, ["b"]) == set()  # reads the graph input
    assert activation_after(model, "b") == "SiLU"
    assert activation_after(model, "r") == "Relu"
    assert activation_after(model, "reg") is None


def test_output_grid_follows_the_activation():
    model = head_model()
    assert output_grid(model, "r", -3.0, 5.0) == {"output_range": (0.0, 5.0)}
    lo, hi = output_grid(model, "b", -40.0, 8.0)["output_range"]
    assert hi == 8.0 and -40.0 < lo < -1.28
    assert output_grid(model, "reg", -3.0, 5.0) == {"output_threshold": 5.0}


def biased_conv_model(rng):
    """X (4 channels, positive like SiLU outputs) -> 3x3 conv 'c' (8 outputs, with bias) -> Y.
    Weights chosen so that round-to-nearest leaves a systematic error in every output channel."""
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.05).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["X", "w", "b"], ["Y"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["Y"], ["S"], name="sig")]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("S", TensorProto.FLOAT, [1, 8, 16, 16])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, w, b


def test_bias_shift_is_minus_the_mean_error_and_removing_it_raises_the_snr():
    rng = np.random.default_rng(1)
    model, w, b = biased_conv_model(rng)
    imgs = [(rng.random((4, 16, 16)) * 3).astype(np.float32) for _ in range(3)]
    # a coarse weight grid (thresholds 4x the abs-max) makes the rounding error large and biased
    w_t = np.abs(w).reshape(8, -1).max(axis=1) * 4
    p = ConvQuantParams("c", 3.0, w_t)
    plain = layer_snr(model, [p], imgs, "X")["c"]
    corrected = layer_snr(model, [p], imgs, "X", correct_bias=True)["c"]
    # numpy reference of the probe: conv(fake_quant(x), fake_quant_per_channel(w)) - conv(x, w)
    import onnxruntime as ort
    from yoloquant.qdq import _quantize_weight
    q_w, s_w, _ = _quantize_weight(w, p)
    wq = (q_w * np.asarray(s_w, np.float32).reshape(8, 1, 1, 1)).astype(np.float32)
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    m2.graph.initializer[0].CopyFrom(numpy_helper.from_array(wq, "w"))
    del m2.graph.output[:]
    m2.graph.output.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16, 16]))
    m1 = onnx.ModelProto()
    m1.CopyFrom(m2)
    m1.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    y = np.concatenate([ort.InferenceSession(m1.SerializeToString(), providers=["CPUExecutionProvider"])
                        .run(None, {"X": i[None]})[0] for i in imgs]).astype(np.float64)
    yq = np.concatenate([ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
                         .run(None, {"X": fake_quant(i[None], 3.0).astype(np.float32)})[0]
                         for i in imgs]).astype(np.float64)
    mean_error = (yq - y).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(corrected.bias_shift, -mean_error, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(plain.bias_shift, corrected.bias_shift)
    # the coarse grid was chosen so that the mean is a sizable part of the error
    assert (mean_error ** 2 / ((yq - y) ** 2).mean(axis=(0, 2, 3))).mean() > 0.2
    var = y.var(axis=(0, 2, 3))
    nsr = (((yq - y) ** 2).mean(axis=(0, 2, 3)) - mean_error ** 2) / var
    assert corrected.snr_db == pytest.approx(-10 * np.log10(nsr.mean()), abs=0.05)
    assert corrected.snr_db > plain.snr_db + 1


def test_bias_shift_in_the_qdq_model_removes_the_mean_error():
    """The deployed int8 conv (ONNX Runtime, fused) with the shifted bias: its mean output error
    per channel is far smaller than without the shift."""
    import onnxruntime as ort
    from yoloquant.qdq import insert_qdq

    rng = np.random.default_rng(2)
    model, w, b = biased_conv_model(rng)
    imgs = [(rng.random((4, 16, 16)) * 3).astype(np.float32) for _ in range(3)]
    w_t = np.abs(w).reshape(8, -1).max(axis=1) * 4
    p = ConvQuantParams("c", 3.0, w_t)
    shift = layer_snr(model, [p], imgs, "X", correct_bias=True)["c"].bias_shift
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16, 16]))

    def mean_error(m):
        f = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        q = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        e = np.concatenate([q.run(None, {"X": i[None]})[0] - f.run(None, {"X": i[None]})[0] for i in imgs])
        return np.abs(e.mean(axis=(0, 2, 3))).max()

    import dataclasses
    before = mean_error(insert_qdq(model, [p]))
    shifted = insert_qdq(model, [dataclasses.replace(p, bias_shift=shift)])
    after = mean_error(shifted)
    assert after < before / 5, (before, after)
    # the original float bias is gone (replaced, not kept beside the new one); the input is intact
    names = {i.name for i in shifted.graph.initializer}
    assert "b" not in names and {i.name for i in model.graph.initializer} == {"w", "b"}
    with pytest.raises(Exception, match="bias_shift has 3 values for 8"):
        insert_qdq(model, [dataclasses.replace(p, bias_shift=np.zeros(3))])
