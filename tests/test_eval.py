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


def test_heldout_config_keeps_the_train_images_calibration_did_not_use(tmp_path):
    import json

    from yoloquant.config import config_from_dict
    from yoloquant.errors import ConfigError
    from yoloquant.evaluate import heldout_config

    anno = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8} for i in (1, 2, 3)],
            "annotations": [{"id": 10 + i, "image_id": i, "bbox": [0, 0, 4, 4], "area": 16,
                             "category_id": 1, "iscrowd": 0} for i in (1, 2, 3, 3)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "train.json").write_text(json.dumps(anno))
    cfg = config_from_dict({"model_dir": "m.onnx", "dataset_dir": str(tmp_path), "train_image_dir": "train",
                            "train_anno_path": "train.json", "val_max_images": 5})
    held = heldout_config(cfg, [1], tmp_path / "work")
    written = json.loads(Path(held.val_anno_path).read_text())
    assert [im["id"] for im in written["images"]] == [2, 3]
    assert sorted(a["image_id"] for a in written["annotations"]) == [2, 3, 3]
    assert held.val_image_dir == "train" and held.val_max_images is None
    assert cfg.val_anno_path is None  # the given config is untouched
    with pytest.raises(ConfigError, match="every annotated train image was used"):
        heldout_config(cfg, [1, 2, 3], tmp_path / "work")
