import json
import logging

import cv2
import numpy as np
import pytest

from yoloquant import assets
from yoloquant.data import CocoDetection, ImageFolder, iterate_batches
from yoloquant.errors import DataError, ModelError
from yoloquant.metrics import CocoEvaluator
from yoloquant.preprocess import Preprocess, boxes_to_original

SPEC = Preprocess((64, 64))
needs_assets = pytest.mark.skipif(
    not assets.have_assets(), reason=f"real COCO/model assets not found in {assets.assets_dir()} (set {assets.ENV_VAR})"
)


def make_coco(root, n_images=3, sizes=None, write_images=True):
    """Tiny COCO set: n images with one box each, two categories (ids 3 and 7)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(n_images):
        h, w = sizes[k] if sizes else (48 + 8 * k, 64)
        name = f"{100 - k:06d}.jpg"  # ids ascend while names descend: order must follow ids
        images.append({"id": 10 + k, "file_name": name, "height": h, "width": w})
        box = [4.0 + k, 6.0, 20.0, 16.0]
        annotations.append({"id": k + 1, "image_id": 10 + k, "category_id": 3 if k % 2 else 7, "bbox": box,
                            "area": box[2] * box[3], "iscrowd": 0})
        if write_images:
            img = np.full((h, w, 3), 90, np.uint8)
            cv2.imwrite(str(images_dir / name), img)
    anno = root / "instances.json"
    anno.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}))
    return images_dir, anno


# ---------------------------------------------------------------- CocoDetection, synthetic

def test_coco_detection_synthetic(tmp_path):
    images_dir, anno = make_coco(tmp_path)
    ds = CocoDetection(images_dir, anno, SPEC)
    assert len(ds) == 3
    assert ds.image_ids == [10, 11, 12]
    assert ds.file_names == ["000100.jpg", "000099.jpg", "000098.jpg"]
    assert ds.category_ids == [3, 7]
    sample = ds.load(2)
    assert sample.tensor.shape == (3, 64, 64) and sample.image_id == 12 and sample.file_name == "000098.jpg"
    assert (sample.info.orig_h, sample.info.orig_w) == (64, 64)
    assert CocoDetection(images_dir, anno, SPEC, max_images=2).image_ids == [10, 11]
    assert CocoDetection(images_dir, anno, SPEC, image_ids=[12, 10]).image_ids == [10, 12]


def test_missing_image_folder(tmp_path):
    _, anno = make_coco(tmp_path)
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        CocoDetection(tmp_path / "nowhere", anno, SPEC)


def test_missing_and_invalid_annotation(tmp_path):
    images_dir, anno = make_coco(tmp_path)
    with pytest.raises(DataError, match="missing.json does not exist"):
        CocoDetection(images_dir, tmp_path / "missing.json", SPEC)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot parse annotation file .*bad.json"):
        CocoDetection(images_dir, bad, SPEC)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="'annotations' list is missing"):
        CocoDetection(images_dir, bad, SPEC)


def test_annotation_referencing_missing_image(tmp_path):
    images_dir, anno = make_coco(tmp_path, n_images=8)
    for name in ("000100.jpg", "000097.jpg"):
        (images_dir / name).unlink()
    with pytest.raises(DataError, match=r"2 of 8 images .* missing from .*000100.jpg, 000097.jpg"):
        CocoDetection(images_dir, anno, SPEC)
    # the check covers the selected images only
    assert len(CocoDetection(images_dir, anno, SPEC, image_ids=[11, 12])) == 2


def test_corrupt_image(tmp_path):
    images_dir, anno = make_coco(tmp_path)
    (images_dir / "000099.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    ds = CocoDetection(images_dir, anno, SPEC)
    with pytest.raises(DataError, match="cannot decode image .*000099.jpg"):
        ds.load(1)
    # and the error reaches the consumer of the batch iterator
    with pytest.raises(DataError, match="000099.jpg"):
        list(iterate_batches(ds, batch_size=2, workers=2, progress=False))


def test_image_size_must_match_annotation(tmp_path):
    images_dir, anno = make_coco(tmp_path, n_images=1)
    cv2.imwrite(str(images_dir / "000100.jpg"), np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(DataError, match="20x10 .* says 64x48"):
        CocoDetection(images_dir, anno, SPEC).load(0)


def test_empty_dataset(tmp_path):
    images_dir, anno = make_coco(tmp_path, n_images=0)
    with pytest.raises(DataError, match="empty"):
        CocoDetection(images_dir, anno, SPEC)
    images_dir, anno = make_coco(tmp_path / "b")
    with pytest.raises(DataError, match="not in"):
        CocoDetection(images_dir, anno, SPEC, image_ids=[10, 999])
    with pytest.raises(DataError, match="max_images"):
        CocoDetection(images_dir, anno, SPEC, max_images=0)


# ---------------------------------------------------------------- batches, ImageFolder

@pytest.mark.parametrize("workers", [0, 1, 3])
def test_iterate_batches_order_and_sizes(tmp_path, workers):
    images_dir, anno = make_coco(tmp_path, n_images=7)
    ds = CocoDetection(images_dir, anno, SPEC)
    batches = list(iterate_batches(ds, batch_size=3, workers=workers, progress=False))
    assert [b.images.shape[0] for b in batches] == [3, 3, 1]
    assert sum((b.image_ids for b in batches), []) == ds.image_ids
    assert batches[0].images.shape == (3, 3, 64, 64) and batches[0].images.dtype == np.float32
    assert [i.orig_h for i in batches[0].infos] == [48, 56, 64]
    ref = np.stack([ds.load(i).tensor for i in range(3)])
    assert np.array_equal(batches[0].images, ref)


def test_iterate_batches_can_stop_early(tmp_path):
    images_dir, anno = make_coco(tmp_path, n_images=7)
    ds = CocoDetection(images_dir, anno, SPEC)
    gen = iterate_batches(ds, batch_size=1, workers=2, progress=False)
    assert next(gen).image_ids == [10]
    gen.close()  # cancels pending work without hanging


def test_image_folder(tmp_path):
    for name in ("b.png", "a.JPG", "c.jpeg"):
        assert cv2.imwrite(str(tmp_path / name), np.zeros((30, 40, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, SPEC)
    assert folder.file_names == ["a.JPG", "b.png", "c.jpeg"]
    sample = folder.load(1)
    assert sample.tensor.shape == (3, 64, 64) and sample.image_id is None and sample.file_name == "b.png"
    assert len(ImageFolder(tmp_path, SPEC, max_images=2)) == 2
    batch = next(iterate_batches(folder, batch_size=3, progress=False))
    assert batch.images.shape == (3, 3, 64, 64)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", SPEC)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no images .*subfolders \\(images\\)"):
        ImageFolder(tmp_path, SPEC)
    (tmp_path / "images" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode image .*x.jpg"):
        ImageFolder(tmp_path / "images", SPEC).load(0)


# ---------------------------------------------------------------- CocoEvaluator, synthetic

def test_evaluator_perfect_detections(tmp_path):
    images_dir, anno = make_coco(tmp_path, n_images=4, write_images=False)
    category_ids = [3, 7]
    ev = CocoEvaluator(anno, category_ids)
    gt = json.loads(anno.read_text())["annotations"]
    for a in gt:
        x, y, w, h = a["bbox"]
        ev.add(a["image_id"], np.array([[x, y, x + w, y + h, 0.9, category_ids.index(a["category_id"])]]))
    result = ev.summarize()
    assert result["map50_95"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert result["images"] == 4 and result["detections"] == 4
    assert "Average Precision" in ev.report
    assert ev.results()[0]["category_id"] in category_ids
    # an image in image_ids without detections counts as missed ground truth
    half = ev.summarize(image_ids=[10, 11])
    assert half["images"] == 2 and half["map50_95"] == pytest.approx(1.0)


def test_evaluator_missed_image_lowers_map(tmp_path):
    _, anno = make_coco(tmp_path, n_images=4, write_images=False)
    ev = CocoEvaluator(anno, [3, 7])
    ev.add(10, np.array([[4, 6, 24, 22, 0.9, 1]]))
    ev.add(12, np.zeros((0, 6)))  # evaluated, nothing found
    result = ev.summarize()
    assert result["images"] == 2 and 0 < result["map50_95"] < 1


def test_evaluator_no_detections_is_zero_with_warning(tmp_path, caplog):
    _, anno = make_coco(tmp_path, n_images=2, write_images=False)
    ev = CocoEvaluator(anno, [3, 7])
    ev.add(10, np.zeros((0, 6)))
    ev.add(11, [])
    with caplog.at_level(logging.WARNING):
        result = ev.summarize()
    assert result["map50_95"] == 0.0 and result["detections"] == 0 and result["images"] == 2
    assert "no detections" in caplog.text


def test_evaluator_errors(tmp_path):
    _, anno = make_coco(tmp_path, n_images=2, write_images=False)
    ev = CocoEvaluator(anno, [3, 7])
    with pytest.raises(ModelError, match="class index 5 .* 2 categories"):
        ev.add(10, np.array([[0, 0, 5, 5, 0.5, 5]]))
    with pytest.raises(DataError, match="image id 999"):
        ev.add(999, np.zeros((0, 6)))
    ev.add(10, np.zeros((0, 6)))
    with pytest.raises(ValueError, match="already added"):
        ev.add(10, np.zeros((0, 6)))
    with pytest.raises(DataError, match="category ids \\[99\\]"):
        CocoEvaluator(anno, [3, 99])


# ---------------------------------------------------------------- real COCO subset

@needs_assets
def test_real_val2017_mini():
    image_dir, anno = assets.asset("coco/val2017_mini/images"), assets.asset("coco/val2017_mini/instances.json")
    ds = CocoDetection(image_dir, anno, Preprocess((640, 640)))
    assert len(ds) == 109
    assert len(ds.category_ids) == 80 and ds.category_ids[0] == 1 and ds.category_ids[-1] == 90
    assert ds.image_ids == sorted(ds.image_ids)
    assert CocoDetection(image_dir, anno, Preprocess((640, 640))).image_ids == ds.image_ids
    sample = ds.load(0)
    assert sample.image_id == ds.image_ids[0] and sample.tensor.shape == (3, 640, 640)


@needs_assets
def test_end_to_end_yolov5n_first_20_images():
    import onnxruntime as ort

    from yoloquant.postprocess import PostprocessSettings, check_output_shape, decode_yolov5, postprocess_batch

    spec = Preprocess((640, 640), pad_mode="center", channel_order="RGB", scale=1 / 255)
    ds = CocoDetection(assets.asset("coco/val2017_mini/images"), assets.asset("coco/val2017_mini/instances.json"),
                       spec, max_images=20)
    session = ort.InferenceSession(str(assets.asset("models/yolov5n.onnx")), providers=["CPUExecutionProvider"])
    check_output_shape(session.get_outputs()[0].shape, spec.input_size, "yolov5")
    evaluator = CocoEvaluator(ds.anno_path, ds.category_ids)
    for batch in iterate_batches(ds, batch_size=1, workers=2, progress=False):
        decoded = decode_yolov5(session.run(None, {"images": batch.images})[0])
        for dets, info, image_id in zip(postprocess_batch(decoded, PostprocessSettings()), batch.infos, batch.image_ids):
            dets[:, :4] = boxes_to_original(dets[:, :4], info)
            evaluator.add(image_id, dets)
    result = evaluator.summarize()
    print(f"yolov5n, first 20 val2017_mini images: {result}")
    assert result["images"] == 20
    # measured 0.345 / 0.561 (onnxruntime 1.32); swapping RGB->BGR alone drops it to 0.316,
    # broken geometry to ~0
    assert 0.33 <= result["map50_95"] <= 0.37
    assert 0.52 <= result["map50"] <= 0.60
