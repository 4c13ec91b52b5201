"""fine_tune: learned rounding on the tiny synthetic model (always) and real yolov5n layers (assets)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from yoloquant.assets import have_assets
from yoloquant.config import config_from_dict, load_config
from yoloquant.errors import ConfigError, ModelError
from yoloquant.fine_tune import fine_tune, settings_from
from yoloquant.ptq import QDQ_ONNX, SUMMARY, calibrate, paddle_params
from yoloquant.recon_units import build_units, find_regions
from yoloquant.reconstruct import ReconSettings, reconstruct
from yoloquant.runtime import OnnxRuntimeBackend, PaddleInferenceBackend, PaddleModelFiles

from test_ptq import tiny_calibration_job, tiny_yolo_onnx

ROOT = Path(__file__).resolve().parent.parent
needs_assets = pytest.mark.skipif(not have_assets(), reason="real assets not found "
                                  "(set YOLOQUANT_ASSETS or put them in ../shared/assets)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ft")
    return root, tiny_calibration_job(root, batch_nums=6, cache="cache/x2paddle")


def _weights_over_scale(cal):
    model = cal.onnx_model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for p in cal.conv_params:
        w = inits[nodes[p.node_name].input[1]].astype(np.float64)
        s = (p.weight_thresholds / 127).astype(np.float32).astype(np.float64).reshape(-1, 1, 1, 1)
        out[p.node_name] = w / s
    return out


@pytest.mark.parametrize("level,simulate", [("layer-wise", False), ("region-wise", True)])
def test_learned_rounding_on_tiny_model(tiny, tmp_path, level, simulate):
    root, raw = tiny
    cfg = config_from_dict(raw)
    cal = calibrate(cfg, tmp_path / "cal", "avg")
    settings = ReconSettings(recon_level=level, simulate_activation_quant=simulate, epochs=40, lr=0.05,
                             drop_prob=0.5)
    result = reconstruct(cal.onnx_model, cal.conv_params, cal.images, cal.converted.onnx_input_name,
                         settings, progress=False)
    ws = _weights_over_scale(cal)
    changed = total = 0
    for name, q in result.ints.items():
        # floor or ceil of w / s: never more than one step from round-to-nearest
        assert np.all(np.abs(q.astype(np.float64) - ws[name]) < 1.0), name
        changed += int((q != result.rtn[name]).sum())
        total += q.size
    assert set(result.ints) == {"conv0", "conv1", "head"}
    assert changed / total > 0.01  # measurably different from round-to-nearest
    before = sum(u.loss_before for u in result.units)
    after = sum(u.loss_after for u in result.units)
    assert after < before
    if level == "region-wise":
        assert len(result.units) == 1 and result.units[0].convs == ["conv0", "conv1", "head"]
    else:
        assert len(result.units) == 3


def test_quantized_inputs_come_from_the_model_quantized_so_far(tiny, tmp_path):
    """recon_input: quantized: unit k is learned on the input the QDQ model gives once units
    0..k-1 carry their learned rounding (not the round-to-nearest model's input), and the
    result lowers the whole model's output error against float."""
    import dataclasses

    from yoloquant.deploy_onnx import build_qdq
    from yoloquant.reconstruct import crop_positions, quantized_crops

    root, raw = tiny
    cfg = config_from_dict(dict(raw, deploy_backend="openvino"))  # every conv int8
    cal = calibrate(cfg, tmp_path / "cal", "avg")

    def model_with(ints):
        params = [dataclasses.replace(p, quantized_weight=ints[p.node_name]) if p.node_name in ints
                  else p for p in cal.conv_params]
        return build_qdq(dataclasses.replace(cal, conv_params=params))

    seen = []

    def quantized_so_far(ints, thresholds=None):
        assert not thresholds  # recon_act_scale calibrated: nothing learned but the rounding
        seen.append(dict(ints))
        return model_with(ints)

    settings = ReconSettings(input_source="quantized", epochs=40, lr=0.05)
    result = reconstruct(cal.onnx_model, cal.conv_params, cal.images, cal.converted.onnx_input_name,
                         settings, quantized_so_far=quantized_so_far, progress=False)
    assert [sorted(s) for s in seen] == [[], ["conv0"], ["conv0", "conv1"]]
    # what unit 2 (the head conv) was given: the model with conv0 and conv1 learned, which
    # differs from the round-to-nearest model's input
    units = build_units(cal.onnx_model, ["conv0", "conv1", "head"], "layer-wise", 6)
    positions = crop_positions(units, len(cal.images), settings)
    from yoloquant.reconstruct import collect_crops

    float_crops = collect_crops(units, cal.onnx_model, cal.images, cal.converted.onnx_input_name,
                                settings, progress=False)
    name = cal.converted.onnx_input_name
    learned = quantized_crops(units[2], model_with({k: result.ints[k] for k in ("conv0", "conv1")}),
                              cal.images, name, settings, positions[2], float_crops[2])
    rtn = quantized_crops(units[2], model_with({}), cal.images, name, settings, positions[2],
                          float_crops[2])
    assert not np.array_equal(learned.x, rtn.x) and np.array_equal(learned.x_float, rtn.x_float)
    assert not np.array_equal(learned.x, float_crops[2].x_float)
    # end to end: the learned model is closer to float than round-to-nearest
    def outputs(model):
        backend = OnnxRuntimeBackend.from_model(model)
        return np.concatenate([backend(img[None]) for img in cal.images])

    ref = outputs(cal.onnx_model)
    err = {k: np.abs(outputs(m) - ref).mean()
           for k, m in (("rtn", model_with({})), ("learned", model_with(result.ints)))}
    assert err["learned"] < err["rtn"], err


def test_fine_tune_job_exports_learned_weights_to_both_runtimes(tiny):
    root, raw = tiny
    # the openvino layout runs every conv in int8 (onnxruntime's keeps the image and head convs
    # float), so all three convs' learned weights are in the QDQ ONNX
    # (no guard here: this is about the export; the guard has its own tests)
    cfg = config_from_dict(dict(raw, recon_images=4, deploy_backend="openvino", recon_guard_images=0))
    out = root / "ft_out"
    fine_tune(cfg, out, settings_from(cfg, "layer-wise", False, epochs=40, lr=0.05, limit=6), progress=False)
    summary = json.loads((out / SUMMARY).read_text())
    rec = summary["reconstruction"]
    assert summary["command"] == "fine_tune" and rec["units"] == 3 and rec["paddle_weights_written"] == 3
    assert rec["changed_fraction"] > 0.01 and rec["loss_after_total"] < rec["loss_before_total"]
    assert all(u["crops"] == 4 * 8 for u in rec["per_unit"])  # recon_images: 4 images x 8 crops
    assert summary["seconds"]["reconstruction"] > 0

    # the QDQ ONNX holds exactly the learned int8 weights
    qdq = onnx.load(str(out / QDQ_ONNX))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    nodes = {n.name: n for n in qdq.graph.node}
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    onnx_ints = {c: inits[dq_of[nodes[c].input[1]].input[0]] for c in ("conv0", "conv1", "head")}
    # the Paddle int8 program holds the same ones
    files = PaddleModelFiles.find(out)
    mapping = {v: k for k, v in rec["paddle_to_onnx"].items()}
    pd = paddle_params(files.model_file, files.params_file, [mapping[c] for c in onnx_ints])
    for c, q in onnx_ints.items():
        assert q.dtype == np.int8
        np.testing.assert_array_equal(pd[mapping[c]], q, err_msg=c)
    # and both int8 runtimes agree on the output (ORT also requantizes conv outputs: not bit-exact)
    x = np.random.default_rng(2).random((1, 3, 64, 64), dtype=np.float32)
    ref = OnnxRuntimeBackend(root / "tiny.onnx")(x)
    ort_int8 = OnnxRuntimeBackend(out / QDQ_ONNX)(x)
    paddle_int8 = PaddleInferenceBackend(files, int8=True)(x)
    assert np.abs(ort_int8 - ref).mean() < 0.02 and np.abs(paddle_int8 - ref).mean() < 0.02
    assert np.abs(ort_int8 - paddle_int8).mean() < 0.01


def test_learned_activation_step_moves_a_too_coarse_grid_towards_the_data(tiny, tmp_path):
    """recon_act_scale learned (LSQ): given conv1's input threshold at 4x the calibrated one (a
    grid 4x too coarse, known answer: shrink it), the learned threshold is smaller; the head's
    is learned too, the image conv's is not (its grid is the image's), and the units' loss
    (learned thresholds and rounding) is below round-to-nearest with the given thresholds."""
    import dataclasses

    root, raw = tiny
    cal = calibrate(config_from_dict(raw), tmp_path / "cal", "avg")
    calibrated = {p.node_name: p.input_threshold for p in cal.conv_params}
    params = [dataclasses.replace(p, input_threshold=4 * p.input_threshold) if p.node_name == "conv1"
              else p for p in cal.conv_params]
    settings = ReconSettings(simulate_activation_quant=True, drop_prob=0.0, act_scale="learned",
                             epochs=40, lr=0.05)
    result = reconstruct(cal.onnx_model, params, cal.images, cal.converted.onnx_input_name,
                         settings, progress=False)
    assert sorted(result.thresholds) == ["conv1", "head"]
    assert result.thresholds["conv1"] < 0.95 * 4 * calibrated["conv1"]
    assert result.thresholds["head"] != calibrated["head"]
    learned = {p.node_name: p.input_threshold for p in result.conv_params}
    assert learned == dict(calibrated, conv1=result.thresholds["conv1"], head=result.thresholds["head"])
    pairs = {c: v for u in result.units for c, v in u.input_thresholds.items()}
    assert pairs["conv1"] == [4 * calibrated["conv1"], result.thresholds["conv1"]]
    assert sum(u.loss_after for u in result.units) < sum(u.loss_before for u in result.units)
    with pytest.raises(ConfigError, match="needs --simulate_activation_quant"):
        ReconSettings(act_scale="learned")


def test_learned_activation_thresholds_reach_both_artifacts(tiny):
    """fine_tune with recon_act_scale learned: the QDQ ONNX's grid of each learned conv input tops
    out at the learned threshold (the openvino layout's asymmetric grid [max(min, -T), T], whose top
    code decodes to T within half a step as the zero point is an integer) and the Paddle int8
    program's Scale tensor of that input holds the threshold."""
    from yoloquant.paddle_params import conv_input_scales, static_mode

    root, raw = tiny
    cfg = config_from_dict(dict(raw, recon_images=4, deploy_backend="openvino", recon_guard_images=0,
                                recon_act_scale="learned"))
    out = root / "ft_act"
    fine_tune(cfg, out, settings_from(cfg, "layer-wise", True, epochs=20, lr=0.05, limit=6), progress=False)
    rec = json.loads((out / SUMMARY).read_text())["reconstruction"]
    learned = {c: pair[1] for c, pair in rec["input_thresholds"].items()}
    assert sorted(learned) == ["conv1", "head"] and rec["paddle_act_thresholds_written"] == 2
    assert all(pair[0] != pair[1] for pair in rec["input_thresholds"].values())
    qdq = onnx.load(str(out / QDQ_ONNX))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    nodes = {n.name: n for n in qdq.graph.node}
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    for conv, t in learned.items():
        dq = dq_of[nodes[conv].input[0]]
        scale, zero_point = float(inits[dq.input[1]]), int(inits[dq.input[2]])
        assert 0 < zero_point <= 128, conv  # a signed input: zero point 128 when its minimum reaches -T
        assert abs(scale * (255 - zero_point) - t) <= scale / 2 + 1e-6 * t, (conv, scale, zero_point, t)
    files = PaddleModelFiles.find(out)
    mapping = {v: k for k, v in rec["paddle_to_onnx"].items()}
    import paddle

    with static_mode():
        program = paddle.static.Program.parse_from_string(files.model_file.read_bytes())
    scales = conv_input_scales(program, [mapping[c] for c in learned])
    values = paddle_params(files.model_file, files.params_file, list(scales.values()))
    for conv, t in learned.items():
        np.testing.assert_allclose(values[scales[mapping[conv]]], t, rtol=1e-5, err_msg=conv)


def test_regions_from_graph_structure(tmp_path):
    tiny_yolo_onnx(tmp_path / "t.onnx")
    model = onnx.load(str(tmp_path / "t.onnx"))
    convs = ["conv0", "conv1", "head"]
    names = lambda regions: [[model.graph.node[k].name for k in r] for r in regions]  # noqa: E731
    assert names(find_regions(model, convs, limit=6)) == [
        ["conv0", "sig0", "mul0", "conv1", "sig1", "mul1", "head"]]
    # limit 1: a conv with its activation; the head conv alone (its output leaves via Reshape)
    assert names(find_regions(model, convs, limit=1)) == [
        ["conv0", "sig0", "mul0"], ["conv1", "sig1", "mul1"], ["head"]]
    units = build_units(model, convs, "region-wise", 2)
    assert [u.convs for u in units] == [["conv0", "conv1"], ["head"]]
    assert units[0].stride == (4, 4) and units[0].out_shape == (16, 16, 16)


def _hardswish_graph() -> onnx.ModelProto:
    """Conv -> HardSigmoid/Mul (HardSwish as PyTorch exports it) -> depthwise Conv -> HardSwish
    node -> Conv: the YOLOv6-Lite block shape."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in
             (("w0", (8, 3, 3, 3)), ("w1", (8, 1, 3, 3)), ("w2", (4, 8, 1, 1)))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], "conv0", pads=[1, 1, 1, 1]),
        helper.make_node("HardSigmoid", ["c0"], ["g0"], "gate0", alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["c0", "g0"], ["a0"], "mul0"),
        helper.make_node("Conv", ["a0", "w1"], ["c1"], "dw1", pads=[1, 1, 1, 1], group=8),
        helper.make_node("HardSwish", ["c1"], ["a1"], "hswish1"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], "pw2")]
    graph = helper.make_graph(nodes, "hswish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_hardswish_blocks_are_reconstructed_with_their_convs():
    """YOLOv6-Lite's HardSwish (HardSigmoid + Mul, or the HardSwish op) is inside the units, and
    the reconstruction interpreter computes it as ONNX Runtime does."""
    import onnxruntime as ort
    import paddle

    from yoloquant.recon_units import graph_constants, layer_units_indices
    from yoloquant.reconstruct import UnitRunner

    model = _hardswish_graph()
    convs = ["conv0", "dw1", "pw2"]
    names = lambda units: [[model.graph.node[k].name for k in u] for u in units]  # noqa: E731
    assert names(layer_units_indices(model, convs)) == [["conv0", "gate0", "mul0"], ["dw1", "hswish1"], ["pw2"]]
    assert names(find_regions(model, convs, limit=6)) == [["conv0", "gate0", "mul0", "dw1", "hswish1", "pw2"]]
    unit = build_units(model, convs, "region-wise", 6)[0]
    x = np.random.default_rng(4).normal(0, 2, (1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = UnitRunner(unit, graph_constants(model), {})(paddle.to_tensor(x), "float").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_quantized_conv_is_an_error(tiny, tmp_path):
    root, raw = tiny
    cal = calibrate(config_from_dict(raw), tmp_path / "cal", "avg")
    with pytest.raises(ModelError, match="no reconstruction region"):
        reconstruct(cal.onnx_model, cal.conv_params, cal.images, cal.converted.onnx_input_name,
                    ReconSettings(recon_level="region-wise"),
                    float_nodes=[p.node_name for p in cal.conv_params], progress=False)


@pytest.mark.parametrize("kwargs,match", [
    ({"recon_level": "block"}, "recon_level"), ({"drop_prob": 1.5}, "drop_prob"),
    ({"beta": (20.0,)}, "recon_beta"), ({"epochs": 0}, "at least 1"), ({"input_source": "x"}, "recon_input")])
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReconSettings(**kwargs)


def test_config_keys_and_cli_flags(tmp_path):
    cfg = load_config(ROOT / "configs" / "yolov5n_coco_mini.yaml")
    assert cfg.drop_prob == 0.5 and cfg.recon_input == "float" and cfg.recon_beta == [20.0, 2.0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_dir: x.onnx\nrecon_input: fp16\n")
    with pytest.raises(ConfigError, match="recon_input"):
        load_config(bad)
    sys.path.insert(0, str(ROOT))
    try:
        import fine_tune as script
    finally:
        sys.path.remove(str(ROOT))
    args = script.build_parser().parse_args(["--config_path", "c.yaml", "--simulate_activation_quant",
                                             "--recon_level", "region-wise"])
    assert args.simulate_activation_quant is True and args.algo == "avg" and args.limit == 6
    assert script.build_parser().parse_args(["--config_path", "c.yaml"]).simulate_activation_quant is False


def test_script_reports_user_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "fine_tune.py"), "--config_path",
                           str(tmp_path / "missing.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: config file not found")
    # learned activation steps without simulated activation quantization: refused before any work
    cfg = tmp_path / "act.yaml"
    cfg.write_text("model_dir: missing.onnx\nrecon_act_scale: learned\n")
    proc = subprocess.run([sys.executable, str(ROOT / "fine_tune.py"), "--config_path", str(cfg),
                           "--save_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: recon_act_scale: learned needs --simulate_activation_quant (the activation steps "
        "are learned through the simulated activation quantization)")
    assert not (tmp_path / "out").exists()


@needs_assets
@pytest.mark.slow
def test_yolov5n_layers_learned_rounding_reduces_error(tmp_path):
    """Real yolov5n, 4 images, the first 3 convs layer-wise and their region: error goes down."""
    cfg = load_config(ROOT / "configs" / "yolov5n_coco_mini.yaml")
    cfg.PTQ.batch_nums = 4
    cal = calibrate(cfg, tmp_path / "cal", "avg")
    keep = [p.node_name for p in cal.conv_params][:3]
    rest = [p.node_name for p in cal.conv_params if p.node_name not in keep]
    for level in ("layer-wise", "region-wise"):
        result = reconstruct(cal.onnx_model, cal.conv_params, cal.images, cal.converted.onnx_input_name,
                             ReconSettings(recon_level=level, epochs=10, limit=3), float_nodes=rest,
                             progress=False)
        assert set(result.ints) == set(keep)
        for u in result.units:
            assert u.loss_after < u.loss_before, (level, u.name)
        ws = _weights_over_scale(cal)
        changed = 0
        for name, q in result.ints.items():
            assert np.all(np.abs(q - ws[name]) < 1.0)
            changed += int((q != result.rtn[name]).sum())
        assert changed > 0


def test_regions_given_by_hand(tmp_path):
    tiny_yolo_onnx(tmp_path / "t.onnx")
    model = onnx.load(str(tmp_path / "t.onnx"))
    convs = ["conv0", "conv1", "head"]
    units = build_units(model, convs, "region-wise", 6, regions=[["images", "act1"]])
    # the head is in no given region: learned on its own
    assert [u.convs for u in units] == [["conv0", "conv1"], ["head"]]
    with pytest.raises(ConfigError, match="also reads 'images'"):
        build_units(model, convs, "region-wise", 6, regions=[["images.x", "act1"]])
    with pytest.raises(ConfigError, match="Reshape"):
        build_units(model, convs, "region-wise", 6, regions=[["act1", "r"]])


def test_bias_correction_after_learned_rounding_reaches_both_runtimes(tiny):
    """conv_bias_correction with fine_tune: measured with the learned weights, written into the
    QDQ ONNX bias and the Paddle bias parameter alike (tiny model: 3 convs with biases)."""
    from yoloquant.paddle_params import conv_bias_params

    root, raw = tiny
    cfg = config_from_dict(dict(raw, recon_images=4, conv_bias_correction=True, deploy_backend="openvino"))
    out = root / "ft_bc"
    fine_tune(cfg, out, settings_from(cfg, "layer-wise", False, epochs=20, lr=0.05, limit=6), progress=False)
    summary = json.loads((out / SUMMARY).read_text())
    rec = summary["reconstruction"]
    assert rec["bias_corrected_convs"] == 3
    mapping = {v: k for k, v in rec["paddle_to_onnx"].items()}
    cal_model = next((root / "cache" / "x2paddle").glob("*/model.pdmodel"))
    biases = conv_bias_params(cal_model, [mapping[c] for c in ("conv0", "conv1", "head")])
    assert len(biases) == 3
    original = paddle_params(cal_model, cal_model.with_suffix(".pdiparams"), list(biases.values()))
    files = PaddleModelFiles.find(out)
    corrected = paddle_params(files.model_file, files.params_file, list(biases.values()))
    qdq = onnx.load(str(out / QDQ_ONNX))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    nodes = {n.name: n for n in qdq.graph.node}
    dq_of = {n.output[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    for conv in ("conv0", "conv1", "head"):
        bias = biases[mapping[conv]]
        shift = corrected[bias] - original[bias]
        assert np.abs(shift).max() > 0, conv
        # ONNX: the int32 bias at scale s_in * s_w dequantizes to the same corrected bias
        dq = dq_of[nodes[conv].input[2]]
        onnx_bias = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]].astype(np.float64)
        step = np.max(inits[dq.input[1]])
        np.testing.assert_allclose(onnx_bias, corrected[bias], atol=step, err_msg=conv)


def test_guard_split_holds_out_the_last_calibration_images():
    from yoloquant.recon_guard import split_guard_images

    images = [np.full((1,), i) for i in range(32)]
    learn, guard = split_guard_images(images, 8)
    assert [int(x[0]) for x in guard] == list(range(24, 32)) and len(learn) == 24
    learn, guard = split_guard_images(images[:6], 8)  # few images: a quarter is held out
    assert len(guard) == 1 and len(learn) == 5
    assert split_guard_images(images, 0) == (images, [])
    with pytest.raises(ConfigError, match="recon_guard_images must be >= 0"):
        split_guard_images(images, -1)


def test_guard_deploys_round_to_nearest_when_learned_rounding_is_worse(tiny, monkeypatch):
    """A reconstruction whose result is further from float on the held-out calibration images
    (here: its int8 weights negated) is not deployed: both artifacts keep round-to-nearest
    weights and summary.json says why."""
    import dataclasses

    import yoloquant.reconstruct as reconstruct_module

    real = reconstruct_module.reconstruct

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.ints = {k: (-v).astype(v.dtype) for k, v in result.ints.items()}
        result.conv_params = [dataclasses.replace(p, quantized_weight=result.ints[p.node_name])
                              if p.node_name in result.ints else p for p in result.conv_params]
        return result

    monkeypatch.setattr(reconstruct_module, "reconstruct", broken)
    root, raw = tiny
    cfg = config_from_dict(dict(raw, deploy_backend="openvino", recon_guard_images=2))
    out = root / "guarded"
    fine_tune(cfg, out, settings_from(cfg, "layer-wise", False, epochs=5, lr=0.05, limit=6),
              progress=False)
    rec = json.loads((out / SUMMARY).read_text())["reconstruction"]
    guard = rec["guard"]
    assert rec["deployed"] == "round-to-nearest" and not guard["deploy_learned"]
    assert guard["images"] == 2 and rec["images"] == 4  # 6 calibration images: 4 + 2
    assert guard["learned"]["snr_db"] < guard["round_to_nearest"]["snr_db"]
    assert rec["paddle_weights_written"] == 0
    # the QDQ ONNX holds round-to-nearest weights: the same file a plain PTQ run writes
    from yoloquant.ptq import quantize

    plain = root / "plain_ptq"
    quantize(cfg, plain)
    ints = lambda d: sorted(numpy_helper.to_array(i).tobytes() for i in onnx.load(str(d / QDQ_ONNX)).graph.initializer  # noqa: E731
                            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4)
    assert ints(out) == ints(plain)
