"""The offline demo: synthetic data set generation and the committed demo model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yoloquant import demo_data
from yoloquant.config import config_from_dict, load_config
from yoloquant.data import CocoDetection
from yoloquant.demo_data import CLASSES, ensure_demo_data, generate, maybe_generate_for
from yoloquant.preprocess import Preprocess

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo_shapes.onnx"
SPEC = Preprocess((256, 256))


def files_of(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo") / "data", n_train=30, n_val=12)


def test_generation_is_deterministic(small_set, tmp_path):
    again = files_of(generate(tmp_path / "again", n_train=30, n_val=12))
    first = files_of(small_set)
    assert again.keys() == first.keys() and len(first) == 30 + 12 + 3
    assert all(again[name] == first[name] for name in first), "same seed, different bytes"
    other = files_of(generate(tmp_path / "other", n_train=0, n_val=2, seed=1))
    assert other["val/images/000001.jpg"] != first["val/images/000001.jpg"]


def test_first_images_do_not_depend_on_the_set_size(small_set, tmp_path):
    # lets tests score the model on the first val images without generating the whole set
    part = generate(tmp_path / "part", n_train=0, n_val=5)
    for k in range(1, 6):
        name = f"val/images/{k:06d}.jpg"
        assert (part / name).read_bytes() == (small_set / name).read_bytes()
    full = json.loads((small_set / "val" / "instances.json").read_text())
    head = json.loads((part / "val" / "instances.json").read_text())
    assert head["annotations"] == [a for a in full["annotations"] if a["image_id"] <= 5]


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_files_load_and_boxes_are_valid(small_set, split):
    ds = CocoDetection(small_set / split / "images", small_set / split / "instances.json", SPEC)
    n = 30 if split == "train" else 12
    assert len(ds) == n and ds.category_ids == [1, 2, 3, 4, 5]
    names = {c["id"]: c["name"] for c in ds.coco.dataset["categories"]}
    assert tuple(names[i] for i in ds.category_ids) == CLASSES
    sample = ds.load(0)  # decodes, size matches its annotation
    assert sample.tensor.shape == (3, 256, 256)
    sizes = set()
    per_image = []
    for img in ds.coco.dataset["images"]:
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=img["id"]))
        per_image.append(len(anns))
        sizes.add((img["width"], img["height"]))
        assert 200 <= img["width"] <= 320 and 200 <= img["height"] <= 320
        for a in anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1
            assert x + w <= img["width"] and y + h <= img["height"]
            assert 0 < a["area"] <= w * h and a["iscrowd"] == 0 and a["category_id"] in names
    assert len(sizes) > n // 2, "image sizes should vary"
    assert max(per_image) <= 9 and sum(per_image) >= 2 * n  # several objects per image


def test_content_statistics(small_set):
    anns = json.loads((small_set / "train" / "instances.json").read_text())["annotations"]
    assert {a["category_id"] for a in anns} == {1, 2, 3, 4, 5}
    side = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in anns])
    assert side.min() < 16 and side.max() > 64  # small and large objects


def test_ensure_demo_data_generates_once_and_replaces_stale_sets(tmp_path, monkeypatch):
    target = tmp_path / "cache" / "demo"
    out = ensure_demo_data(target, n_train=2, n_val=2)
    assert out == target and (target / "val" / "instances.json").is_file()
    stamp = (target / "val" / "images" / "000001.jpg").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated an up-to-date data set")

    monkeypatch.setattr(demo_data, "generate", must_not_run)
    ensure_demo_data(target, n_train=2, n_val=2)
    monkeypatch.undo()
    assert (target / "val" / "images" / "000001.jpg").stat().st_mtime_ns == stamp

    ensure_demo_data(target, n_train=2, n_val=3)  # other parameters: the old set is replaced
    assert len(list((target / "val" / "images").iterdir())) == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]  # no temp folders left


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
