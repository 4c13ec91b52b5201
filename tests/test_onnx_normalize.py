"""Graph rewrites that let X2Paddle 1.6.0 convert real YOLO exports: each must be exact."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant import assets
from yoloquant.errors import ModelError
from yoloquant.onnx_normalize import (describe_io, drop_unit_pool_dilations,
                                      fill_resize_optional_inputs, fold_constant_subgraphs,
                                      fold_shape_constants, load_onnx,
                                      normalize, split_to_slices, sum_to_adds)

NEEDS_ASSETS = pytest.mark.skipif(
    not assets.have_assets(),
    reason=f"real YOLO models not found under {assets.assets_dir()} (set {assets.ENV_VAR})")


def make_model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7  # what onnxruntime and x2paddle both accept for these opsets
    onnx.checker.check_model(model)
    return model


def vinfo(name, shape):
    """A float value; an int shape means "this rank, dims unknown" (as exporters often write)."""
    if isinstance(shape, int):
        shape = [None] * shape
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def assert_same_outputs(original, rewritten, shape, atol=1e-5):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for a, b in zip(run(original, x), run(rewritten, x)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= atol


def ops(model):
    return [n.op_type for n in model.graph.node]


# ----------------------------------------------------------------------------- synthetic graphs
def maxpool_model(dilations):
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                            dilations=dilations, name="pool")
    return make_model([node], [vinfo("x", [1, 3, 16, 16])], [vinfo("y", 4)])


def resize_model():
    """YOLOv5's Upsample export: sizes = Concat(Shape(x)[:2], Cast(floor(const) ...))."""
    f = lambda name, v: numpy_helper.from_array(np.array(v), name)  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Constant", [], ["h"], value=f("hv", 16.0)),
        helper.make_node("Constant", [], ["w"], value=f("wv", 24.0)),
        helper.make_node("Floor", ["h"], ["hf"]),
        helper.make_node("Floor", ["w"], ["wf"]),
        helper.make_node("Unsqueeze", ["hf", "ax0"], ["hu"]),
        helper.make_node("Unsqueeze", ["wf", "ax0"], ["wu"]),
        helper.make_node("Concat", ["hu", "wu"], ["hw"], axis=0),
        helper.make_node("Cast", ["hw"], ["hw_i"], to=TensorProto.INT64),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Slice", ["shape", "s0", "s2", "ax0"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw_i"], ["sizes"], axis=0),
        helper.make_node("Resize", ["r", "", "", "sizes"], ["y"], name="resize", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2], np.int64), "s2")]
    return make_model(nodes, [vinfo("x", [1, 4, 8, 12])], [vinfo("y", 4)], inits)


def split_model(opset=13):
    """YOLOv5 Detect head: split 85 channels into xy / wh / scores (sizes as an input)."""
    if opset >= 13:
        split = helper.make_node("Split", ["x", "sizes"], ["xy", "wh", "cls"], axis=3, name="split")
        inits = [numpy_helper.from_array(np.array([2, 2, 81], np.int64), "sizes")]
    else:
        split = helper.make_node("Split", ["x"], ["xy", "wh", "cls"], axis=3, split=[2, 2, 81],
                                 name="split")
        inits = []
    nodes = [split,
             helper.make_node("Sigmoid", ["xy"], ["xy2"]),
             helper.make_node("Concat", ["xy2", "wh", "cls"], ["y"], axis=3)]
    return make_model(nodes, [vinfo("x", [1, 3, 4, 85])], [vinfo("y", 4)], inits, opset=opset)


# ----------------------------------------------------------------------------- rewrites
def test_maxpool_unit_dilations_are_dropped():
    original = maxpool_model([1, 1])
    model, counts = normalize(original)
    assert counts["drop_unit_pool_dilations"] == 1
    assert not [a for n in model.graph.node for a in n.attribute if a.name == "dilations"]
    assert_same_outputs(original, model, (1, 3, 16, 16), atol=0)


def test_maxpool_real_dilations_are_kept():
    model = maxpool_model([2, 2])
    assert drop_unit_pool_dilations(model) == 0
    assert [a.ints for a in model.graph.node[0].attribute if a.name == "dilations"] == [[2, 2]]


def test_resize_with_shape_derived_sizes_becomes_constant():
    original = resize_model()
    model, counts = normalize(original)
    assert counts["fold_shape_constants"] > 0
    assert counts["fill_resize_optional_inputs"] == 1
    assert not {"Shape", "Floor", "Cast", "Slice"} & set(ops(model))
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert all(resize.input), "x2paddle cannot index past an empty input name"
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits[resize.input[3]].tolist() == [1, 4, 16, 24]
    assert inits[resize.input[1]].size == 0 and inits[resize.input[2]].size == 0
    assert_same_outputs(original, model, (1, 4, 8, 12), atol=0)


def test_fold_leaves_plain_constants_alone():
    # No Shape in the graph: nothing is "shape-derived", so nothing is folded.
    assert fold_shape_constants(maxpool_model([1, 1])) == 0
    assert fill_resize_optional_inputs(maxpool_model([1, 1])) == 0


def anchor_grid_model():
    """YOLOv6's in-graph anchor points: a float64 grid built from constants (Expand, Unsqueeze,
    Concat, opset-13 Squeeze with an axes input), cast to float32 and added to the prediction;
    plus a conv whose weight is computed from constants (left as exported)."""
    f = lambda name, v: numpy_helper.from_array(np.array(v), name)  # noqa: E731
    nodes = [
        helper.make_node("Constant", [], ["ys"], value=f("ys_v", np.arange(4, dtype=np.float64))),
        helper.make_node("Constant", [], ["shape"], value=f("shape_v", np.array([3, 4], np.int64))),
        helper.make_node("Expand", ["ys", "shape"], ["grid"]),
        helper.make_node("Unsqueeze", ["grid", "axes"], ["grid4"]),
        helper.make_node("Concat", ["grid4", "grid4"], ["pairs"], axis=-1),
        helper.make_node("Squeeze", ["grid4", "axes"], ["flat_unused"]),
        helper.make_node("Cast", ["pairs"], ["anchors"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w_half", "two"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "to_grid"], ["c3"]),
        helper.make_node("Add", ["c3", "anchors"], ["y"]),
    ]
    inits = [f("axes", np.array([-1], np.int64)), f("two", np.array(2.0, np.float32)),
             f("w_half", np.full((2, 1, 1, 1), 0.5, np.float32)),
             f("to_grid", np.array([3, 4, 2], np.int64))]
    return make_model(nodes, [vinfo("x", [1, 1, 3, 4])], [vinfo("y", 3)], inits)


def test_constant_chains_become_initializers_and_float64_leaves_the_graph():
    original = anchor_grid_model()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    removed = fold_constant_subgraphs(model)
    onnx.checker.check_model(model)
    assert {"Expand", "Unsqueeze", "Concat", "Squeeze", "Cast"}.isdisjoint(ops(model))
    assert removed == 7  # the grid chain (Squeeze_unused read nobody: gone too); Mul stays
    assert "Mul" in ops(model)  # the conv weight is still computed as exported
    assert TensorProto.DOUBLE not in {t.data_type for t in model.graph.initializer}
    assert_same_outputs(original, model, (1, 1, 3, 4), atol=0)
    assert fold_constant_subgraphs(model) == 0  # nothing left to fold


def test_split_with_sizes_input_becomes_slices():
    original = split_model(opset=13)
    model, counts = normalize(original)
    assert counts["split_to_slices"] == 1
    assert "Split" not in ops(model) and ops(model).count("Slice") == 3
    assert "sizes" not in {t.name for t in model.graph.initializer}
    assert_same_outputs(original, model, (1, 3, 4, 85), atol=0)


def sum_model(n_inputs):
    """Y = Sum(X, 2X, 3X, ...): each term distinct, so a repeated or dropped term shows."""
    terms = ["X"]
    nodes, inits = [], []
    for k in range(2, n_inputs + 1):
        inits.append(numpy_helper.from_array(np.array(k, np.float32), f"k{k}"))
        nodes.append(helper.make_node("Mul", ["X", f"k{k}"], [f"t{k}"], name=f"mul{k}"))
        terms.append(f"t{k}")
    nodes.append(helper.make_node("Sum", terms, ["Y"], name="sum"))
    return make_model(nodes, [vinfo("X", [1, 2, 3])], [vinfo("Y", [1, 2, 3])], inits)


def test_sum_of_three_or_more_becomes_a_chain_of_adds():
    original = sum_model(3)  # RepVGG before re-parameterisation: 3x3 + 1x1 + identity
    model, counts = normalize(original)
    assert counts["sum_to_adds"] == 1
    assert "Sum" not in ops(model) and ops(model).count("Add") == 2
    assert_same_outputs(original, model, (1, 2, 3), atol=1e-6)
    x = np.ones((1, 2, 3), np.float32)
    assert np.allclose(run(model, x)[0], 6.0)  # 1 + 2 + 3, not x2paddle's 1 + 2 + 1


def test_sum_of_two_is_left_alone():
    model = sum_model(2)
    assert sum_to_adds(model) == 0
    assert "Sum" in ops(model)


def test_split_attribute_form_is_left_alone():
    model = split_model(opset=11)
    assert split_to_slices(model) == 0
    assert "Split" in ops(model)


def test_normalize_does_not_modify_its_argument():
    original = resize_model()
    before = original.SerializeToString()
    normalize(original)
    assert original.SerializeToString() == before


# ----------------------------------------------------------------------------- static input
def dynamic_model():
    node = helper.make_node("Relu", ["x"], ["y"])
    return make_model([node], [vinfo("x", ["batch", 3, 32, 32])], [vinfo("y", 4)])


def test_dynamic_input_is_refused_with_a_fix():
    with pytest.raises(ModelError, match="fixed input size"):
        normalize(dynamic_model())


def test_input_shape_pins_dynamic_dims():
    model, counts = normalize(dynamic_model(), input_shape=(1, 3, 32, 32))
    assert counts["fix_input_shape"] == 1
    assert describe_io(model)[1] == (1, 3, 32, 32)


def test_input_shape_must_match_fixed_dims():
    with pytest.raises(ModelError, match="does not fit"):
        normalize(dynamic_model(), input_shape=(1, 3, 64, 64))


def test_describe_io_infers_undeclared_output_shapes():
    name, shape, outs, out_shapes = describe_io(split_model())
    assert (name, shape, outs, out_shapes) == ("x", (1, 3, 4, 85), ["y"], [(1, 3, 4, 85)])


# ----------------------------------------------------------------------------- loading
def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelError, match="ONNX model not found") as err:
        load_onnx(missing)
    assert str(missing) in str(err.value) and "model_dir" in str(err.value)


@pytest.mark.parametrize("garbage", [b"\xff\xfe not a model \x00" * 50, b"hello world"])
def test_load_corrupt_file(tmp_path, garbage):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(garbage)
    with pytest.raises(ModelError) as err:
        load_onnx(bad)
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------- real models
@NEEDS_ASSETS
@pytest.mark.parametrize("name", ["yolov5n", "yolox_nano"])
def test_real_models_normalize_exactly(name):
    original = load_onnx(assets.asset(f"models/{name}.onnx"))
    model, counts = normalize(original)
    _, shape, _, out_shapes = describe_io(model)
    assert out_shapes == describe_io(original)[3]
    assert_same_outputs(original, model, shape, atol=1e-5)
    if name == "yolov5n":
        assert counts["drop_unit_pool_dilations"] == 3
        assert counts["fill_resize_optional_inputs"] == 2
        assert counts["split_to_slices"] == 3
        assert not {"Shape", "Split"} & set(ops(model))


@NEEDS_ASSETS
def test_yolov6_lite_anchor_grid_is_folded_exactly():
    """The YOLOv6-Lite export computes its anchor points in float64 from constants; folded, the
    graph x2paddle converts has no float64 tensor and no Squeeze with an axes input (where
    x2paddle's shape inference stopped: "Incomplete symbolic shape inference")."""
    original = load_onnx(assets.asset("models/yolov6lite_m_320.onnx"))
    model, counts = normalize(original)
    assert counts["fold_constant_subgraphs"] > 0
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    assert TensorProto.DOUBLE not in types | {t.data_type for t in model.graph.initializer}
    assert "Squeeze" not in ops(model) and "Expand" not in ops(model)
    assert_same_outputs(original, model, (1, 3, 320, 320), atol=0)


def test_conv_weights_given_as_constant_nodes_become_initializers():
    """paddle2onnx writes conv weights as Constant nodes; the Q/DQ writer reads initializers."""
    from yoloquant.onnx_normalize import conv_constants_to_initializers

    w = np.random.default_rng(0).standard_normal((2, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "ignored")),
             helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")]
    original = make_model(nodes, [vinfo("X", [1, 3, 4, 4])], [vinfo("Y", [1, 2, 4, 4])])
    model = onnx.ModelProto()
    model.CopyFrom(original)
    assert conv_constants_to_initializers(model) == 1
    assert ops(model) == ["Conv"] and [i.name for i in model.graph.initializer] == ["W"]
    onnx.checker.check_model(model)
    assert_same_outputs(original, model, (1, 3, 4, 4), atol=0)
    assert conv_constants_to_initializers(model) == 0
