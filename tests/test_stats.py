"""Paired bootstrap intervals over per-image COCO matches (yoloquant.stats)."""
import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yoloquant.assets import have_assets
from yoloquant.stats import (ImageMatches, bootstrap_interval, map_interval, paired_delta,
                             resample_weights)

ROOT = Path(__file__).resolve().parent.parent
needs_assets = pytest.mark.skipif(not have_assets(), reason="real assets not found "
                                  "(set YOLOQUANT_ASSETS or put them in ../shared/assets)")


def scene(n_images=40, n_cats=4, seed=0, noise=(0.08,), recall=(0.8,), fp_rate=3.0, ties=False,
          crowded_image=False):
    """COCO ground truth and one detection array per (noise, recall) model, on the same objects.

    Category n_cats never has ground truth (COCO skips it), every 7th image has none, 5% of the
    boxes are crowd; each model finds an object with probability `recall`, its box jittered by
    `noise` x its size, and adds Poisson(fp_rate) false positives per image."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], [[] for _ in noise]
    for i in range(n_images):
        iid = 100 + i
        images.append({"id": iid, "file_name": f"{iid}.jpg", "width": 640, "height": 480})
        for _ in range(rng.integers(0, 6) if i % 7 else 0):
            cat = int(rng.integers(1, n_cats))
            w, h = rng.uniform(5, 200, 2)
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            for m, (sigma, p) in enumerate(zip(noise, recall)):
                if rng.random() < p:
                    j = rng.normal(0, sigma * min(w, h), 4)
                    dets[m].append([iid, x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1),
                                    rng.uniform(0.3, 1.0), cat])
        for m in range(len(noise)):
            for _ in range(rng.poisson(fp_rate)):
                w, h = rng.uniform(5, 200, 2)
                dets[m].append([iid, rng.uniform(0, 400), rng.uniform(0, 300), w, h,
                                rng.uniform(0, 0.9), int(rng.integers(1, n_cats + 1))])
    if crowded_image:  # more than COCO's 100 detections of one category in one image
        for m in range(len(noise)):
            dets[m] += [[100, rng.uniform(0, 400), rng.uniform(0, 300), 30, 30, rng.uniform(0, 1), 1]
                        for _ in range(150)]
    arrays = [np.array(d, dtype=np.float64) for d in dets]
    if ties:
        for a in arrays:
            a[:, 5] = np.round(a[:, 5], 1)
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": str(c)} for c in range(1, n_cats + 1)]}
    return gt, arrays


def coco_eval(gt, dets, image_ids=None):
    """(COCOeval after evaluate(), its stats after accumulate() and summarize())."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        matches = ImageMatches.from_cocoeval(ev)
        ev.accumulate()
        ev.summarize()
    return matches, ev.stats


@pytest.mark.parametrize("kwargs", [dict(seed=0), dict(seed=1, ties=True), dict(seed=2, fp_rate=20),
                                    dict(seed=3, crowded_image=True), dict(seed=4, n_cats=2)])
def test_unit_weights_reproduce_pycocotools(kwargs):
    gt, (dets,) = scene(**kwargs)
    matches, stats = coco_eval(gt, dets)
    map50_95, map50 = matches.score()
    assert 0.1 < stats[0] < 0.9
    assert abs(map50_95 - stats[0]) < 1e-12 and abs(map50 - stats[1]) < 1e-12


def test_integer_weights_equal_the_images_repeated():
    """A resample is the image set with each image repeated w times: scored by pycocotools on
    such a repeated set (new ids, copied boxes), the AP equals the weighted one."""
    gt, (dets,) = scene(n_images=30, seed=5)
    matches, _ = coco_eval(gt, dets)
    weights = resample_weights(matches.images, 4, seed=1)
    got50_95, got50 = matches.average_precision(weights)
    for b, w in enumerate(weights):
        images, anns, rows = [], [], []
        for index, image_id in enumerate(matches.image_ids):
            for _ in range(w[index]):
                new_id = len(images) + 1
                images.append({"id": new_id, "file_name": "x.jpg", "width": 640, "height": 480})
                anns += [dict(a, id=len(anns) + 1 + k, image_id=new_id) for k, a in
                         enumerate(a for a in gt["annotations"] if a["image_id"] == image_id)]
                rows += [np.r_[new_id, d[1:]] for d in dets[dets[:, 0] == image_id]]
        _, stats = coco_eval(dict(gt, images=images, annotations=anns), np.array(rows))
        assert abs(got50_95[b] - stats[0]) < 1e-12 and abs(got50[b] - stats[1]) < 1e-12


def test_identical_models_give_exactly_zero():
    gt, (dets,) = scene(seed=6)
    a, _ = coco_eval(gt, dets)
    b, _ = coco_eval(gt, dets.copy())
    d = paired_delta(a, b)
    assert (d.map50_95.value, d.map50_95.lo, d.map50_95.hi) == (0.0, 0.0, 0.0)
    assert (d.map50.lo, d.map50.hi) == (0.0, 0.0)
    assert not d.map50_95.excludes_zero()
    assert d.as_dict()["delta_ci95"] == [0.0, 0.0] and d.resamples == 1000


def test_interval_covers_the_true_difference():
    """Known answer: two models on a population of 300 images, whose mAP difference on the
    whole population is the truth. Evaluation sets of 80 images are drawn from it; the 95%
    interval of each must contain the truth in about 95% of the draws, and its width must match
    the actual spread of the 80-image estimates. The same for one model's own mAP (where the
    plain percentile interval covered only 86%: the reason for the basic interval)."""
    gt, (good, worse) = scene(n_images=300, seed=7, noise=(0.05, 0.065), recall=(0.85, 0.82))
    a, _ = coco_eval(gt, good)
    b, _ = coco_eval(gt, worse)
    truth = b.score()[0] - a.score()[0]
    assert -0.12 < truth < -0.03  # about the interval's half-width: not trivially excluded
    rng = np.random.default_rng(0)
    covered, covered_own, estimates, widths = 0, 0, [], []
    trials = 50
    for _ in range(trials):
        chosen = rng.choice(a.images, 80, replace=False)
        weights = np.zeros((201, a.images))
        weights[0, chosen] = 1  # row 0: the drawn set itself; then bootstrap resamples of it
        weights[1:, chosen] = resample_weights(80, 200, seed=int(rng.integers(1 << 30)))
        map_a = a.average_precision(weights)[0]
        diff = b.average_precision(weights)[0] - map_a
        ci = bootstrap_interval(diff[0], diff[1:])
        covered += ci.lo <= truth <= ci.hi
        own = bootstrap_interval(map_a[0], map_a[1:])
        covered_own += own.lo <= a.score()[0] <= own.hi
        estimates.append(diff[0])
        widths.append(ci.hi - ci.lo)
    assert covered / trials >= 0.88 and covered_own / trials >= 0.88, (covered, covered_own)
    spread = 2 * 1.96 * np.std(estimates)  # the width a correct 95% interval should have
    assert 0.7 < np.mean(widths) / spread < 1.6, (np.mean(widths), spread)


def test_clear_loss_excludes_zero_and_unpaired_data_is_refused():
    gt, (good, worse) = scene(n_images=120, seed=8, noise=(0.04, 0.2), recall=(0.9, 0.6))
    a, _ = coco_eval(gt, good)
    b, _ = coco_eval(gt, worse)
    d = paired_delta(a, b)
    assert d.map50_95.hi < 0 and d.map50_95.lo < d.map50_95.value < d.map50_95.hi
    assert d.map50_95.excludes_zero()
    own = map_interval(a)
    assert own.lo < own.value < own.hi and abs(own.value - a.score()[0]) < 1e-12
    subset, _ = coco_eval(gt, good, image_ids=[im["id"] for im in gt["images"][:60]])
    with pytest.raises(ValueError, match="same images"):
        paired_delta(a, subset)


def test_mean_of_several_candidates():
    gt, (a_dets, b_dets, c_dets) = scene(seed=9, noise=(0.05, 0.1, 0.15), recall=(0.8, 0.8, 0.8))
    a, b, c = (coco_eval(gt, d)[0] for d in (a_dets, b_dets, c_dets))
    d = paired_delta(a, [b, c])
    expected = (b.score()[0] + c.score()[0]) / 2 - a.score()[0]
    assert abs(d.map50_95.value - expected) < 1e-12


def test_model_without_detections_scores_zero(tmp_path):
    import json

    from yoloquant.metrics import CocoEvaluator

    gt, (dets,) = scene(seed=10)
    path = tmp_path / "scene.json"
    path.write_text(json.dumps(gt))
    ev = CocoEvaluator(path, [1, 2, 3, 4])
    for im in gt["images"]:
        ev.add(im["id"], np.zeros((0, 6)))
    assert ev.summarize()["map50_95"] == 0.0
    empty = ev.matches
    assert empty.score() == (0.0, 0.0)
    real, _ = coco_eval(gt, dets)
    assert empty.same_ground_truth(real)
    d = paired_delta(empty, real)
    assert abs(d.map50_95.value - real.score()[0]) < 1e-12 and d.map50_95.lo > 0


@needs_assets
def test_yolov5n_matches_reproduce_pycocotools_on_real_detections():
    from yoloquant.config import load_config
    from yoloquant.evaluate import evaluate_backend
    from yoloquant.runtime import OnnxRuntimeBackend

    cfg = load_config(ROOT / "configs" / "yolov5n_coco_mini.yaml")
    r = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir))
    assert r.images == 109 and r.matches.images == 109
    map50_95, map50 = r.matches.score()
    assert abs(map50_95 - r.map50_95) < 1e-9 and abs(map50 - r.map50) < 1e-9
    d = paired_delta(r.matches, r.matches)
    assert (d.map50_95.lo, d.map50_95.hi) == (0.0, 0.0)
    own = map_interval(r.matches)
    assert own.lo < r.map50_95 < own.hi and own.hi - own.lo > 0.01  # 109 images: wide


def test_snr_db_is_one_definition_for_floats_arrays_and_identical_outputs():
    from yoloquant.stats import MAX_SNR_DB, snr_db

    assert snr_db(0.01) == pytest.approx(20.0) and isinstance(snr_db(0.01), float)
    assert snr_db(0.0) == MAX_SNR_DB  # bit-identical: capped, not infinite
    np.testing.assert_allclose(snr_db(np.array([1.0, 1e-3, 0.0])), [0.0, 30.0, MAX_SNR_DB])
    assert snr_db(None) is None  # not measured
