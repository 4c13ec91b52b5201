"""ONNX -> Paddle conversion: cache keyed by content, exact-enough outputs, clear errors."""
import json
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from yoloquant import assets, convert
from yoloquant.convert import convert_onnx_to_paddle, read_feed_fetch
from yoloquant.errors import ModelError

NEEDS_ASSETS = pytest.mark.skipif(
    not assets.have_assets(),
    reason=f"real YOLO models not found under {assets.assets_dir()} (set {assets.ENV_VAR})")
REAL_MODELS = {"yolov5n": (1, 3, 640, 640), "yolox_nano": (1, 3, 416, 416)}
TOLERANCE = 1e-3


def no_x2paddle(*args, **kwargs):
    raise AssertionError("x2paddle was called although the conversion is cached")


# ----------------------------------------------------------------------------- synthetic model
def mini_yolo(path):
    """A tiny detector graph with every pattern the real exports need rewritten.

    Conv+SiLU -> MaxPool(dilations=1) -> Resize(sizes from Shape) -> Conv to 85 channels ->
    NHWC -> Split(sizes input) -> Sigmoid on xy -> Concat -> [1, N, 85].
    """
    rng = np.random.default_rng(0)
    arr = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [
        arr("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
        arr("b1", rng.standard_normal(8).astype(np.float32) * 0.1),
        arr("w2", rng.standard_normal((85, 8, 1, 1)).astype(np.float32) * 0.3),
        arr("ax0", np.array([0], np.int64)), arr("s0", np.array([0], np.int64)),
        arr("s2", np.array([2], np.int64)), arr("hw", np.array([32, 32], np.int64)),
        arr("split", np.array([2, 2, 81], np.int64)), arr("flat", np.array([1, -1, 85], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        helper.make_node("Mul", ["c1", "s1"], ["a1"], name="silu1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="pool", kernel_shape=[5, 5],
                         pads=[2, 2, 2, 2], strides=[1, 1], dilations=[1, 1]),
        helper.make_node("Shape", ["p1"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "s0", "s2", "ax0"], ["nc"], name="nc"),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["p1", "", "", "sizes"], ["up"], name="up", mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["up", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["c2"], ["nhwc"], name="nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Split", ["nhwc", "split"], ["xy", "wh", "cls"], name="head", axis=3),
        helper.make_node("Sigmoid", ["xy"], ["xy_s"], name="sig_xy"),
        helper.make_node("Concat", ["xy_s", "wh", "cls"], ["cat"], name="cat", axis=3),
        helper.make_node("Reshape", ["cat", "flat"], ["output"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "mini_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1024, 85])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The mini model converted once; the cache folder and the result."""
    root = tmp_path_factory.mktemp("mini")
    path = mini_yolo(root / "mini_yolo.onnx")
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    cache = root / "cache"
    t0 = time.perf_counter()
    result = convert_onnx_to_paddle(path, cache_dir=cache, verify_image=x, tolerance=TOLERANCE)
    return path, cache, result, time.perf_counter() - t0


def test_mini_model_converts_exactly(mini):
    path, cache, result, _ = mini
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.normalize_counts["drop_unit_pool_dilations"] == 1
    assert result.normalize_counts["fill_resize_optional_inputs"] == 1
    assert result.normalize_counts["split_to_slices"] == 1
    assert result.onnx_input_name == "images"
    assert result.paddle_input_name == read_feed_fetch(result.model_file)[0][0]
    assert result.paddle_input_name == "x2paddle_images"
    assert result.input_shape == (1, 3, 32, 32) and result.output_names == ("output",)
    assert result.model_file.is_file() and result.params_file.is_file()
    assert result.model_dir.parent == cache.resolve()
    assert result.sha256 in result.model_dir.name
    # The finished entry was moved in whole: no work folder is left behind.
    assert [p.name for p in cache.iterdir()] == [result.model_dir.name]


def test_cache_hit_skips_x2paddle(mini, monkeypatch):
    path, cache, first, _ = mini
    monkeypatch.setattr(convert, "_run_x2paddle", no_x2paddle)
    again = convert_onnx_to_paddle(path, cache_dir=cache)  # no_x2paddle: raises if x2paddle runs
    assert again == first


def test_broken_cache_entry_is_rebuilt_then_verified_once(mini, tmp_path, monkeypatch):
    path, _, first, _ = mini
    cache = tmp_path / "cache"
    shutil.copytree(first.model_dir, cache / first.model_dir.name)
    (cache / first.model_dir.name / "model.pdiparams").unlink()  # e.g. a user cleaned up badly
    again = convert_onnx_to_paddle(path, cache_dir=cache)
    assert again.params_file.is_file() and again.max_abs_diff is None
    # An entry converted without a check is checked on the first hit that asks for it.
    monkeypatch.setattr(convert, "_run_x2paddle", no_x2paddle)
    x = np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32)
    checked = convert_onnx_to_paddle(path, cache_dir=cache, verify_image=x)
    assert checked.max_abs_diff is not None and checked.max_abs_diff < 1e-4
    assert convert_onnx_to_paddle(path, cache_dir=cache).max_abs_diff == checked.max_abs_diff


def test_verification_failure_raises_and_caches_nothing(mini, tmp_path):
    path = mini[0]
    cache = tmp_path / "cache"
    x = np.zeros((1, 3, 32, 32), np.float32)
    # A negative tolerance cannot be met: exercises the failure path deterministically.
    with pytest.raises(ModelError, match="differs from ONNX by .* on output output"):
        convert_onnx_to_paddle(path, cache_dir=cache, verify_image=x, tolerance=-1.0)
    assert not [p for p in cache.iterdir() if not p.name.startswith("failed-")]


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(convert.CACHE_ENV_VAR, str(tmp_path))
    assert convert.default_cache_dir() == tmp_path.resolve()
    monkeypatch.delenv(convert.CACHE_ENV_VAR)
    assert convert.default_cache_dir().parts[-2:] == ("cache", "x2paddle")


# ----------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ModelError, match="ONNX model not found") as err:
        convert_onnx_to_paddle(missing, cache_dir=tmp_path / "cache")
    assert str(missing) in str(err.value)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" + bytes(range(256)) * 4)
    with pytest.raises(ModelError) as err:
        convert_onnx_to_paddle(bad, cache_dir=tmp_path / "cache")
    assert str(bad) in str(err.value)


def test_unsupported_op_is_named_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_run_x2paddle", no_x2paddle)
    grid = numpy_helper.from_array(np.zeros((1, 8, 8, 2), np.float32), "grid")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("GridSample", ["r", "grid"], ["y"], name="warp")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], [grid])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    path = tmp_path / "grid.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=r"GridSample \(nodes: warp\)"):
        convert_onnx_to_paddle(path, cache_dir=tmp_path / "cache")


def test_x2paddle_mapping_failure_names_the_node(tmp_path):
    # A real dilation (2) cannot be dropped, and x2paddle's MaxPool refuses it.
    node = helper.make_node("MaxPool", ["x"], ["y"], name="dilated_pool", kernel_shape=[3, 3],
                            dilations=[2, 2])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 12, 12])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "dilated.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="node 'dilated_pool' of op type MaxPool") as err:
        convert_onnx_to_paddle(path, cache_dir=tmp_path / "cache")
    log_file = str(err.value).rsplit("Full log: ", 1)[1]
    assert "only dilations" in open(log_file).read()


# ----------------------------------------------------------------------------- real models
@pytest.fixture(scope="session")
def real_conversions(tmp_path_factory):
    """Each real model converted once per test run into a private cache."""
    cache = tmp_path_factory.mktemp("x2paddle_cache")
    done = {}

    def get(name):
        if name not in done:
            t0 = time.perf_counter()
            result = convert_onnx_to_paddle(assets.asset(f"models/{name}.onnx"), cache_dir=cache,
                                            verify_image=assets.asset("images/bus.jpg"),
                                            tolerance=TOLERANCE)
            done[name] = (result, time.perf_counter() - t0)
        return done[name][0], cache, done[name][1]

    return get


@NEEDS_ASSETS
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_converts_and_matches_onnx(real_conversions, name):
    result, _, seconds = real_conversions(name)
    print(f"{name}: converted+verified in {seconds:.1f} s, max abs diff {result.max_abs_diff:.3g}")
    assert result.max_abs_diff is not None
    assert result.input_shape == REAL_MODELS[name]
    assert result.paddle_input_name == "x2paddle_images"
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["max_scaled_diff"] <= TOLERANCE
    # Coordinates are in pixels (hundreds): FP32 summation-order noise stays near 1e-3 there.
    assert result.max_abs_diff < 1e-2


@NEEDS_ASSETS
def test_real_model_cache_hit_by_content(real_conversions, tmp_path, monkeypatch):
    first, cache, _ = real_conversions("yolov5n")
    monkeypatch.setattr(convert, "_run_x2paddle", no_x2paddle)
    again = convert_onnx_to_paddle(assets.asset("models/yolov5n.onnx"), cache_dir=cache,
                                   verify_image=assets.asset("images/bus.jpg"))  # no x2paddle run
    assert again == first
    renamed = tmp_path / "my_detector.onnx"  # same bytes, another name: same entry
    shutil.copyfile(assets.asset("models/yolov5n.onnx"), renamed)
    assert convert_onnx_to_paddle(renamed, cache_dir=cache).model_dir == first.model_dir


def test_dynamic_input_asks_for_a_fixed_size(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "_run_x2paddle", no_x2paddle)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="fixed input size"):
        convert_onnx_to_paddle(path, cache_dir=tmp_path / "cache")


def sum_branches(path):
    """RepVGG before re-parameterisation: Relu(conv3x3(x) + conv1x1(x) + x) as one 3-input Sum."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1")]
    nodes = [helper.make_node("Conv", ["images", "w3"], ["a"], name="c3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["images", "w1"], ["b"], name="c1", kernel_shape=[1, 1]),
             helper.make_node("Sum", ["a", "b", "images"], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["output"], name="relu")]
    graph = helper.make_graph(nodes, "repvgg", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_three_input_sum_is_converted_correctly(tmp_path, monkeypatch):
    """x2paddle 1.6 maps Sum(a, b, c) to a + b + a; the sum_to_adds rewrite avoids it."""
    path = sum_branches(tmp_path / "repvgg.onnx")
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    result = convert_onnx_to_paddle(path, cache_dir=tmp_path / "cache", verify_image=x, tolerance=TOLERANCE)
    assert result.normalize_counts["sum_to_adds"] == 1 and result.max_abs_diff < 1e-4
    # the upstream bug, shown: without the rewrite the converted model computes something else
    from yoloquant import onnx_normalize
    monkeypatch.setattr(onnx_normalize, "REWRITES",
                        tuple(r for r in onnx_normalize.REWRITES if r[0] != "sum_to_adds"))
    with pytest.raises(ModelError, match="differ"):
        convert_onnx_to_paddle(path, cache_dir=tmp_path / "cache2", verify_image=x, tolerance=TOLERANCE)
