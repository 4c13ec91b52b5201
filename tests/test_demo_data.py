"""The offline demo data set: deterministic generation in COCO format."""
import json
from pathlib import Path

import numpy as np
import pytest

from yoloquant import demo_data
from yoloquant.data import CocoDetection
from yoloquant.demo_data import CLASSES, ensure_demo_data, generate
from yoloquant.preprocess import Preprocess

ROOT = Path(__file__).resolve().parent.parent
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
