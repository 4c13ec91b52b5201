"""analysis.py: per-layer sensitivity (resumable, deterministic), outputs, target search."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from yoloquant.analysis import (CALIBRATED_MODEL, CALIBRATION, CHECKPOINT, HIST_PNG, RANK_CSV,
                                RANK_JSON, RANK_PNG, RANK_TXT, SKIP_YAML, STAT_CSV, TARGET_DIR,
                                run_analysis, search_prefix, spearman)
from yoloquant.assets import have_assets
from yoloquant.config import config_from_dict
from yoloquant.errors import ConfigError

from test_ptq import tiny_yolo_onnx  # pytest puts tests/ on sys.path
from tiny_job import write_split

ROOT = Path(__file__).resolve().parent.parent
needs_assets = pytest.mark.skipif(not have_assets(), reason="real assets not found "
                                  "(set YOLOQUANT_ASSETS or put them in ../shared/assets)")


def rows_of(save_dir: Path) -> list:
    return json.loads((save_dir / RANK_JSON).read_text())["layers"]


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    image = mpimg.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # something is drawn, not a blank canvas


# ---- pure helpers -------------------------------------------------------------------------
def test_prefix_bisection_finds_smallest_prefix_with_few_evaluations():
    curve = [0.30, 0.31, 0.315, 0.32, 0.325, 0.33, 0.333, 0.336, 0.338, 0.339, 0.34] + [0.341] * 50
    calls = []

    def evaluate(k):
        calls.append(k)
        return curve[k]

    k, scores = search_prefix(evaluate, len(curve) - 1, 0.3355, {0: curve[0], len(curve) - 1: 0.341})
    assert k == 7 and scores[7] >= 0.3355 > scores[6]
    assert len(calls) <= 6  # log2(60) evaluations, not one per layer
    assert search_prefix(evaluate, 60, 0.29, {0: 0.30})[0] == 0


def test_target_drop_is_points_below_the_float_map():
    from yoloquant.analysis.target import target_of

    assert target_of(config_from_dict({"target_drop": 1.5}), 0.3100) == pytest.approx(0.2950)
    assert target_of(config_from_dict({"target_metric": 0.29}), 0.3100) == 0.29


def test_spearman_matches_scipy_and_handles_degenerate_input():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.random(20), rng.random(20)
    assert spearman(list(a), list(b)) == pytest.approx(spearmanr(a, b).correlation)
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_resume_is_a_real_switch():
    import importlib.util

    spec = importlib.util.spec_from_file_location("analysis_script", ROOT / "analysis.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parser = script.build_parser()
    assert parser.parse_args(["--config_path", "c.yaml"]).resume is False
    assert parser.parse_args(["--config_path", "c.yaml", "--resume"]).resume is True
    with pytest.raises(SystemExit):  # the seed's `--resume False` (type=bool) meant True
        parser.parse_args(["--config_path", "c.yaml", "--resume", "False"])


# ---- tiny synthetic model (no assets) ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_analysis")
    tiny_yolo_onnx(root / "tiny.onnx")
    write_split(root, "train")
    write_split(root, "val")
    raw = {"model_dir": str(root / "tiny.onnx"), "dataset_dir": str(root),
           "train_image_dir": "train", "train_anno_path": "train.json", "val_image_dir": "val",
           "val_anno_path": "val.json", "cache_dir": str(root / "cache"),
           "analysis_max_images": 4, "analysis_proxy_images": 2,
           "PTQ": {"algo": "abs_max", "batch_nums": 4}}
    return root, raw


def test_tiny_model_kill_and_resume_equals_one_run(tiny):
    root, raw = tiny
    whole = run_analysis(config_from_dict(dict(raw, save_dir=str(root / "whole"))), progress=False)
    assert whole.complete and len(whole.rows) == 3
    cfg = config_from_dict(dict(raw, save_dir=str(root / "split")))
    first = run_analysis(cfg, stop_after=1, progress=False)  # a kill after the first layer
    assert not first.complete
    assert len(json.loads((root / "split" / CHECKPOINT).read_text())["results"]) == 1
    assert (root / "split" / CALIBRATED_MODEL).stat().st_size > 0  # what resume builds on
    resumed = run_analysis(cfg, resume=True, progress=False)
    assert resumed.complete
    assert rows_without_time(resumed.rows) == rows_without_time(whole.rows)
    for name in (RANK_CSV, RANK_TXT, STAT_CSV, RANK_PNG, HIST_PNG):
        assert (root / "split" / name).stat().st_size > 0
    assert_png(root / "split" / RANK_PNG)
    assert_png(root / "split" / HIST_PNG)


def rows_without_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_tiny_model_proxy_only_ranks_without_map(tiny):
    root, raw = tiny
    save = root / "proxy"
    result = run_analysis(config_from_dict(dict(raw, save_dir=str(save), analysis_proxy_only=True)),
                          progress=False)
    assert result.complete and result.spearman["proxy_vs_map"] is None
    snr = [r["snr_quant_only_db"] for r in result.rows]
    assert snr == sorted(snr)  # the noisiest conv first
    assert all(r["map_quant_only"] is None and r["snr_float_only_db"] is None for r in result.rows)
    assert "analysis_proxy_only: sensitivity = alone" in (save / RANK_TXT).read_text()
    assert_png(save / RANK_PNG)


def test_tiny_model_resume_refuses_a_changed_config(tiny):
    root, raw = tiny
    save = root / "whole"
    if not (save / CHECKPOINT).is_file():
        run_analysis(config_from_dict(dict(raw, save_dir=str(save))), progress=False)
    changed = config_from_dict(dict(raw, save_dir=str(save), PTQ={"algo": "avg", "batch_nums": 4}))
    with pytest.raises(ConfigError, match="different model, data or config.*PTQ"):
        run_analysis(changed, resume=True, progress=False)


def test_tiny_model_target_above_float_is_refused(tiny):
    root, raw = tiny
    save = root / "whole"
    if not (save / CHECKPOINT).is_file():
        run_analysis(config_from_dict(dict(raw, save_dir=str(save))), progress=False)
    cfg = config_from_dict(dict(raw, save_dir=str(save), get_target_quant_model=True,
                                target_metric=0.9))
    with pytest.raises(ConfigError, match="above the float model's mAP"):
        run_analysis(cfg, resume=True, progress=False)
    with pytest.raises(ConfigError, match="target_metric and target_drop are null"):
        run_analysis(config_from_dict(dict(raw, save_dir=str(save), get_target_quant_model=True)),
                     resume=True, progress=False)


def test_tiny_model_target_search_measures_the_model_it_saves(tiny):
    """The search scores the deployed layout (deploy_backend) from the saved calibration, so
    the model it saves measures what the search found (a conv-only search did not)."""
    from yoloquant.analysis import TARGET_DIR

    root, raw = tiny
    save = root / "whole"
    if not (save / CHECKPOINT).is_file():
        run_analysis(config_from_dict(dict(raw, save_dir=str(save))), progress=False)
    assert json.loads((save / CALIBRATION).read_text())["tensor_ranges"]  # saved for --resume
    cfg = config_from_dict(dict(raw, save_dir=str(save), get_target_quant_model=True,
                                target_drop=0.0))
    found = run_analysis(cfg, resume=True, progress=False).target
    assert found["met"] and found["target_drop"] == 0.0
    assert found["confirmed_map"] == pytest.approx(found["searched_map"], abs=1e-9)
    assert found["full_evaluations"] == len(found["evaluations"]) + 1  # no walk after the save
    d = found["all_int8_delta"]  # set when the all-int8 model missed the target
    if d is not None:
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
        assert "deployed all-int8 model vs float" in (save / RANK_TXT).read_text()
    assert (save / TARGET_DIR / "model_int8.onnx").is_file()


def test_a_missed_target_inside_the_all_int8_interval_is_called_noise():
    from yoloquant.analysis.target import noise_warning
    from yoloquant.stats import Interval

    # yolov5n on 64 images: all-int8 -1.03 points, the target 1 point below float
    warning = noise_warning(-0.0100, Interval(-0.0103, -0.0190, -0.0020), 64)
    assert "misses the target by 0.03 points" in warning and "64 images" in warning
    assert "-1.03 [-1.90, -0.20]" in warning
    assert noise_warning(-0.0100, Interval(-0.0090, -0.0190, -0.0020), 64) is None  # met
    assert noise_warning(-0.0100, Interval(-0.0300, -0.0400, -0.0200), 64) is None  # clearly missed


def test_unknown_analysis_layer_names_the_closest(tiny):
    root, raw = tiny
    cfg = config_from_dict(dict(raw, save_dir=str(root / "bad"), analysis_layers=["conv1x"]))
    with pytest.raises(ConfigError, match="analysis_layers names 'conv1x'.*closest: conv1"):
        run_analysis(cfg, progress=False)


def test_tiny_model_quantize_keeps_a_skipped_conv_float(tiny):
    """The target model is saved by ptq.quantize with a skip list: the skipped conv must stay
    float in both artifacts (onnx_format used to crash on it)."""
    import onnx
    from paddle.base.proto import framework_pb2

    from yoloquant.ptq import PADDLE_MODEL, QDQ_ONNX, quantize

    root, raw = tiny
    cal = json.loads((root / "whole" / CALIBRATION).read_text()) \
        if (root / "whole" / CALIBRATION).is_file() else None
    if cal is None:
        run_analysis(config_from_dict(dict(raw, save_dir=str(root / "whole"))), progress=False)
        cal = json.loads((root / "whole" / CALIBRATION).read_text())
    weight, node = sorted(cal["paddle_to_onnx"].items())[0]
    result = quantize(config_from_dict(dict(raw, skip_tensor_list=[weight])), root / "skipped")
    assert weight not in result.summary["quantized"]["paddle_weights"]
    assert node in result.summary["kept_float"]["conv_nodes"]
    assert len(result.summary["quantized"]["onnx_conv_nodes"]) == len(cal["paddle_to_onnx"]) - 1
    qdq = onnx.load(str(root / "skipped" / QDQ_ONNX))
    conv = next(n for n in qdq.graph.node if n.name == node)
    assert conv.input[1] in {i.name for i in qdq.graph.initializer}  # its float weight, no DQ
    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString((root / "skipped" / PADDLE_MODEL).read_bytes())
    quant_inputs = {a for op in desc.blocks[0].ops if op.type in ("quantize_linear", "dequantize_linear")
                    for var in op.inputs for a in var.arguments}
    assert weight not in quant_inputs


# ---- real yolov5n ---------------------------------------------------------------------------
LAYERS = ["conv2d_0.w_0", "conv2d_5.w_0", "conv2d_59.w_0"]  # stem, a backbone conv, a head conv


def yolov5n_cfg(save_dir: Path, **extra):
    raw = yaml.safe_load((ROOT / "configs" / "yolov5n_analysis.yaml").read_text())
    raw.update(save_dir=str(save_dir), analysis_layers=LAYERS, analysis_max_images=5,
               analysis_proxy_images=2, get_target_quant_model=False, target_metric=None,
               target_drop=None)
    raw["PTQ"] = dict(raw["PTQ"], batch_nums=8)
    raw.update(extra)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def yolov5n_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolov5n_analysis")
    whole = run_analysis(yolov5n_cfg(root / "whole"), progress=False)
    cfg = yolov5n_cfg(root / "split")
    stopped = run_analysis(cfg, stop_after=2, progress=False)
    resumed = run_analysis(cfg, resume=True, progress=False)
    return root, whole, stopped, resumed


@needs_assets
def test_yolov5n_ranking_is_deterministic_and_resumable(yolov5n_runs):
    root, whole, stopped, resumed = yolov5n_runs
    assert not stopped.complete and resumed.complete
    # two independent calibrations gave bit-identical scales ...
    cal_a = json.loads((root / "whole" / CALIBRATION).read_text())
    cal_b = json.loads((root / "split" / CALIBRATION).read_text())
    assert cal_a["conv_params"] == cal_b["conv_params"] and len(cal_a["conv_params"]) == 60
    # ... and the interrupted + resumed ranking equals the uninterrupted one, number for number
    assert rows_without_time(resumed.rows) == rows_without_time(whole.rows)
    assert [r["paddle_weight"] for r in whole.rows] == [r["paddle_weight"] for r in rows_of(root / "split")]
    assert sorted(r["paddle_weight"] for r in whole.rows) == sorted(LAYERS)
    ref = whole.reference
    assert ref["float_map"] > 0.2 and ref["float_map"] - ref["int8_map"] < 0.05
    int8_snr = 10 * math.log10(1 / ref["int8_nsr"])
    for r in whole.rows:  # one int8 conv adds less noise to the head outputs than all of them
        assert r["snr_quant_only_db"] > int8_snr + 3
    stats = (root / "whole" / STAT_CSV).read_text().splitlines()
    assert stats[0].startswith("rank,paddle_weight,onnx_node,weight_shape") and len(stats) == 4
    assert_png(root / "whole" / RANK_PNG)
    assert_png(root / "whole" / HIST_PNG)


@needs_assets
def test_yolov5n_cached_evaluation_equals_the_validator(yolov5n_runs):
    from yoloquant.evaluate import evaluate_backend
    from yoloquant.runtime import OnnxRuntimeBackend

    root, whole, _, _ = yolov5n_runs
    cfg = yolov5n_cfg(root / "whole")
    reference = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir), max_images=5)
    assert whole.reference["float_map"] == pytest.approx(reference.map50_95, abs=1e-6)


@needs_assets
def test_yolov5n_target_above_float_is_refused(yolov5n_runs):
    root, whole, _, _ = yolov5n_runs
    too_high = round(whole.reference["float_map"] + 0.01, 4)
    cfg = yolov5n_cfg(root / "whole", get_target_quant_model=True, target_metric=too_high)
    with pytest.raises(ConfigError, match="above the float model's mAP"):
        run_analysis(cfg, resume=True, progress=False)


@needs_assets
@pytest.mark.slow  # a second Paddle calibration (quantize) on top of the shared runs
def test_yolov5n_target_model_meets_the_target(yolov5n_runs):
    from yoloquant.evaluate import evaluate_backend
    from yoloquant.ptq import PADDLE_MODEL, QDQ_ONNX, SUMMARY
    from yoloquant.runtime import OnnxRuntimeBackend

    from yoloquant.analysis import load_calibration
    from yoloquant.deploy_onnx import build_qdq

    root, whole, _, _ = yolov5n_runs
    cfg = yolov5n_cfg(root / "whole")
    # the target: what keeping the analysed convs float reaches (if above all-int8), so the
    # search has to find float layers; floored to 4 decimals as a user would write it. Capped
    # at the float model's mAP, which analysis refuses to exceed: on 5 images an int8 model
    # can score above float, and by how much depends on the CPU's int8 kernels (an AMD EPYC
    # gave 0.3704 against float 0.3622; a Xeon with AMX stays below float).
    cal = load_calibration(cfg, root / "whole" / CALIBRATION)
    nodes = [r["onnx_node"] for r in whole.rows]
    import onnx

    # the deployed layout (the search measures the model it saves)
    onnx.save(build_qdq(cal, nodes), str(root / "analysed_float.onnx"))
    reachable = evaluate_backend(cfg, OnnxRuntimeBackend(root / "analysed_float.onnx"),
                                 max_images=5).map50_95
    target = math.floor(min(max(reachable, whole.reference["int8_map"]),
                            whole.reference["float_map"]) * 1e4) / 1e4
    cfg = yolov5n_cfg(root / "whole", get_target_quant_model=True, target_metric=target)
    result = run_analysis(cfg, resume=True, progress=False)  # the sweep is reused, not redone
    found = result.target
    assert found["met"] and found["confirmed_map"] >= target
    if found["float_layers"]:  # all-int8 missed the target: its interval against float was measured
        d = found["all_int8_delta"]
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
        assert d["delta"] < target - whole.reference["float_map"] + 1e-9
    out = root / "whole" / TARGET_DIR
    assert (out / PADDLE_MODEL).is_file() and (out / QDQ_ONNX).is_file()
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["quantized"]["skipped_by_user"]["as_given"] == found["skip_tensor_list"]
    assert set(found["skip_tensor_list"]) <= set(LAYERS)
    # the saved model, scored independently by the validator, meets the target
    measured = evaluate_backend(cfg, OnnxRuntimeBackend(out / QDQ_ONNX), max_images=5)
    assert measured.map50_95 == pytest.approx(found["confirmed_map"], abs=1e-6)
    assert measured.map50_95 >= target
    snippet = yaml.safe_load((root / "whole" / SKIP_YAML).read_text())
    assert snippet == {"skip_tensor_list": found["skip_tensor_list"], "min_layer_snr_db": None,
                       "keep_regression_float": False}
