import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant.errors import ModelError
from yoloquant.gptq import gptq_round, gptq_weights, input_hessians, sample_patches
from yoloquant.qdq import ConvQuantParams


def conv_model(c_in=4, c_out=6, kernel=3, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
               group=1, size=12, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c_out, c_in // group, kernel, kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[kernel, kernel],
                            strides=list(strides), pads=list(pads), dilations=list(dilations),
                            group=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), w


def run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("kernel,strides,pads,dilations", [(3, (1, 1), (1, 1, 1, 1), (1, 1)),
                                                            (3, (2, 2), (1, 0, 2, 1), (1, 1)),
                                                            (3, (1, 2), (2, 2, 2, 2), (2, 2)),
                                                            (1, (1, 1), (0, 0, 0, 0), (1, 1)),
                                                            (1, (2, 2), (0, 0, 0, 0), (1, 1))])
def test_patches_times_weight_is_the_conv_output(kernel, strides, pads, dilations):
    model, w = conv_model(kernel=kernel, strides=strides, pads=pads, dilations=dilations)
    x = np.random.default_rng(1).normal(size=(1, 4, 12, 12)).astype(np.float32)
    y = run(model, x)[0]  # (C_out, H', W')
    geometry = {"kernel": (kernel, kernel), "strides": strides, "pads": pads, "dilations": dilations}
    patches = sample_patches(x[0], geometry, count=10 ** 6, rng=np.random.default_rng(0))
    assert patches.shape == (y.shape[1] * y.shape[2], 4 * kernel * kernel)
    np.testing.assert_allclose(patches @ w.reshape(6, -1).T, y.reshape(6, -1).T, rtol=1e-4, atol=1e-4)
    # sampling keeps whole patches: each sampled row is one of the rows above
    some = sample_patches(x[0], geometry, count=7, rng=np.random.default_rng(0))
    assert some.shape == (7, 4 * kernel * kernel)
    assert all(np.any(np.all(np.isclose(patches, row), axis=1)) for row in some)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 20))
    scale = np.abs(w).max(axis=1) / 127
    q = gptq_round(w, np.eye(20) * 3.0, scale)
    np.testing.assert_array_equal(q, np.clip(np.round(w / scale[:, None]), -127, 127))


def test_gptq_lowers_the_output_error_of_correlated_inputs():
    rng = np.random.default_rng(3)
    # inputs with strongly correlated columns, as neighbouring pixels / channels are
    x = rng.normal(size=(4000, 6)) @ rng.normal(size=(6, 30)) + 0.1 * rng.normal(size=(4000, 30))
    w = rng.normal(size=(16, 30)) * np.linspace(0.2, 2.0, 30)
    scale = np.abs(w).max(axis=1) / 127
    h = x.T @ x / len(x)
    q = gptq_round(w, h, scale)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)

    def output_error(ints):
        return float(np.mean((x @ (w - ints * scale[:, None]).T) ** 2))

    assert output_error(q) < 0.5 * output_error(nearest)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    # a change of rounding, not of scale: nearly every weight within one step of its value
    assert np.mean(np.abs(q - w / scale[:, None]) <= 1.0) > 0.95


def test_gptq_ignores_dead_inputs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 10))
    x[:, 3] = 0.0  # an input channel that is always zero
    w = rng.normal(size=(4, 10))
    scale = np.abs(w).max(axis=1) / 127
    q = gptq_round(w, x.T @ x / 500, scale)
    assert np.all(q[:, 3] == 0)
    with pytest.raises(ModelError, match="Hessian shape"):
        gptq_round(w, np.eye(9), scale)


def test_gptq_weights_of_a_grouped_conv_round_each_group_with_its_own_inputs():
    model, w = conv_model(c_in=4, c_out=4, group=4)  # depthwise
    images = [np.random.default_rng(i).normal(size=(4, 12, 12)).astype(np.float32) for i in range(3)]
    hessians = input_hessians(model, ["conv"], images, "x")
    assert len(hessians["conv"]) == 4 and hessians["conv"][0].shape == (9, 9)
    t = np.abs(w.reshape(4, -1)).max(axis=1)
    t[2] = 0.0  # a dead output channel: quantized to 0, as qdq does
    q = gptq_weights(model, [ConvQuantParams("conv", 1.0, t)], images, "x")["conv"]
    assert q.shape == w.shape and q.dtype == np.int8
    assert np.all(q[2] == 0)
    live = [0, 1, 3]
    assert np.all(np.abs(q[live] - w[live] / (t[live] / 127).reshape(-1, 1, 1, 1)) <= 1.5)


def test_auto_pad_convs_are_refused_with_a_way_out():
    model, _ = conv_model()
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER"),
                           helper.make_attribute("kernel_shape", [3, 3])])
    with pytest.raises(ModelError, match="weight_rounding: nearest"):
        input_hessians(model, ["conv"], [np.zeros((4, 12, 12), np.float32)], "x")
    with pytest.raises(ModelError, match="no Conv named"):
        input_hessians(model, ["nope"], [], "x")
