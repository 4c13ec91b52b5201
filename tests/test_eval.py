"""eval.py: float mAP from ONNX Runtime and from the converted Paddle model, and its CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from yoloquant.assets import have_assets
from yoloquant.evaluate import evaluate_command

ROOT = Path(__file__).resolve().parent.parent
needs_assets = pytest.mark.skipif(not have_assets(), reason="real assets not found "
                                  "(set YOLOQUANT_ASSETS or put them in ../shared/assets)")


@needs_assets
def test_yolov5n_fp32_onnxruntime_and_paddle_agree(tmp_path):
    out = tmp_path / "r.json"
    ort, paddle = evaluate_command(str(ROOT / "configs/yolov5n_coco_mini.yaml"), runtime="both",
                                   json_out=str(out))
    assert ort.images == paddle.images == 109
    assert ort.runtime == "onnxruntime" and paddle.runtime.startswith("paddle-inference")
    assert abs(ort.map50_95 - paddle.map50_95) <= 0.002
    # independent reference measured for this model and protocol (centred letterbox)
    assert abs(ort.map50_95 - 0.308) <= 0.003
    assert 0.48 <= ort.map50 <= 0.51
    saved = json.loads(out.read_text())
    assert {r["runtime"] for r in saved} == {ort.runtime, paddle.runtime}
    assert {"map50_95", "map50", "images", "runtime", "seconds"} <= set(saved[0])


@needs_assets
def test_yolox_nano_fp32_onnxruntime_and_paddle_agree():
    ort, paddle = evaluate_command(str(ROOT / "configs/yolox_nano_coco_mini.yaml"), runtime="both")
    assert abs(ort.map50_95 - 0.30) <= 0.005
    assert abs(ort.map50_95 - paddle.map50_95) <= 0.002


def run_eval(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_missing_config_is_one_clear_error():
    r = run_eval("--config_path", "configs/nope.yaml")
    assert r.returncode == 2
    assert "error: config file not found: configs/nope.yaml" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_config_typo_names_the_closest_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_dri: m.onnx\n")
    r = run_eval("--config_path", str(cfg))
    assert r.returncode == 2 and "did you mean 'model_dir'" in r.stderr


def test_cli_missing_model_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_dir: {tmp_path / 'missing.onnx'}\nval_image_dir: x\nval_anno_path: y\n")
    r = run_eval("--config_path", str(cfg))
    assert r.returncode == 2 and "missing.onnx" in r.stderr and "not found" in r.stderr


def test_cli_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_dir: {bad}\nval_image_dir: x\nval_anno_path: y\n")
    r = run_eval("--config_path", str(cfg))
    assert r.returncode == 2 and "bad.onnx" in r.stderr and "Traceback" not in r.stderr


@needs_assets
def test_cli_prints_table_and_final_line(tmp_path):
    out = tmp_path / "r.json"
    r = run_eval("--config_path", "configs/yolov5n_coco_mini.yaml", "--max_images", "5",
                 "--json", str(out))
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("mAP@0.5:0.95 = ") and "mAP@0.5 = " in last
    assert json.loads(out.read_text())["images"] == 5
