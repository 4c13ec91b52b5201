"""The offline demo: the committed demo model, its config, and the README's first command
(the data set generator is tested in test_demo_data.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yoloquant import demo_data
from yoloquant.config import config_from_dict, load_config
from yoloquant.demo_data import CLASSES, generate, maybe_generate_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo_shapes.onnx"


def test_maybe_generate_for_acts_on_the_demo_folder_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_data, "ensure_demo_data", lambda d: calls.append(Path(d)) or Path(d))
    monkeypatch.chdir(tmp_path)
    assert maybe_generate_for(config_from_dict({"dataset_dir": str(tmp_path / "coco")})) is None
    assert calls == []
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert maybe_generate_for(cfg) == Path("cache/demo_data")
    assert calls == [Path("cache/demo_data")]


# ---------------------------------------------------------------- the committed model
def test_demo_model_has_the_yolov5_output_layout():
    ort = pytest.importorskip("onnxruntime")
    assert MODEL.stat().st_size < 3_000_000
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    inp, = session.get_inputs()
    out, = session.get_outputs()
    assert inp.shape == [1, 3, 256, 256]
    rows = 3 * sum((256 // s) ** 2 for s in (8, 16, 32))
    assert out.shape == [1, rows, 5 + len(CLASSES)]
    y = session.run(None, {inp.name: np.full((1, 3, 256, 256), 114 / 255, np.float32)})[0]
    assert y.shape == (1, rows, 5 + len(CLASSES))
    assert (y[..., 4:] >= 0).all() and (y[..., 4:] <= 1).all()  # sigmoid already applied
    assert (y[..., 2:4] > 0).all() and np.abs(y[..., :2] - 128).max() < 200  # input pixels


def test_demo_model_accuracy_on_val(tmp_path, monkeypatch):
    """The real thing: the committed model scored by our validator on generated val images."""
    from yoloquant.evaluate import evaluate_backend
    from yoloquant.runtime import OnnxRuntimeBackend

    n_val = 100  # the first 100 images of the demo val split (see test above)
    data = generate(tmp_path / "demo_data", n_train=0, n_val=n_val)
    monkeypatch.chdir(ROOT)  # config paths are relative to the current directory
    cfg = load_config("configs/demo.yaml")
    cfg.dataset_dir = str(data)
    result = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir))
    assert result.images == n_val
    assert result.map50_95 >= 0.5, result
    assert result.map50 > result.map50_95


@pytest.mark.slow
def test_readme_default_runs_end_to_end(tmp_path):
    """The README's first command (post_quant.py on configs/demo.yaml with --eval), here on the
    first 60 val images: it generates the data if needed, quantizes, and prints FP32 vs INT8.
    Stated margin: each INT8 runtime within 2 points of FP32 (measured on all 300: see README)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "post_quant.py", "--save_dir", str(out), "--eval",
                           "--max_images", "60"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FP32 demo_shapes.onnx" in proc.stdout and "points vs FP32" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["images"] == 32
    rows = {r["runtime"] if not r["model"].startswith("FP32") else "fp32": r["map50_95"]
            for r in summary["metrics"]}
    assert rows["fp32"] >= 0.5
    for runtime in ("onnxruntime", "paddle-inference(onednn-int8)"):
        assert rows["fp32"] - rows[runtime] <= 0.02, (runtime, rows)
    assert (out / "model_int8.onnx").is_file() and (out / "model.pdmodel").is_file()
