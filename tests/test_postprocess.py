import math

import numpy as np
import pytest

from yoloquant.errors import ModelError
from yoloquant.postprocess import (
    PostprocessSettings,
    check_output_shape,
    decode_yolov5,
    decode_yolox,
    multiclass_nms,
    nms,
    postprocess_batch,
)


# ---------------------------------------------------------------- pure-Python references

def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_nms(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(ref_iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


def ref_multiclass_nms(boxes_scores, conf, thr, multi_label, max_det):
    """Per class, independently: candidates above conf, greedy NMS; then merge by score."""
    boxes = boxes_scores[:, :4].tolist()
    scores = boxes_scores[:, 4:]
    cands = []  # (score, box index, class)
    for i in range(len(boxes)):
        if multi_label:
            cands += [(float(scores[i, c]), i, c) for c in range(scores.shape[1]) if scores[i, c] > conf]
        else:
            c = int(np.argmax(scores[i]))
            if scores[i, c] > conf:
                cands.append((float(scores[i, c]), i, c))
    out = []
    for c in sorted({c for _, _, c in cands}):
        mine = [(s, i) for s, i, cc in cands if cc == c]
        keep = ref_nms([boxes[i] for _, i in mine], [s for s, _ in mine], thr)
        out += [boxes[mine[k][1]] + [mine[k][0], c] for k in keep]
    out.sort(key=lambda r: -r[4])
    return np.array(out[:max_det], dtype=np.float64).reshape(-1, 6)


def clustered_boxes(rng, n, n_clusters=6, size=300.0):
    """Boxes jittered around a few centres so that many overlap (NMS has work to do)."""
    centres = rng.uniform(0, size, (n_clusters, 2))
    c = centres[rng.integers(0, n_clusters, n)] + rng.normal(0, 8, (n, 2))
    wh = rng.uniform(10, 60, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], axis=1)


# ---------------------------------------------------------------- NMS

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.65])
def test_nms_matches_reference(seed, thr):
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, 200)
    scores = rng.random(200)
    keep = nms(boxes, scores, thr)
    assert keep.tolist() == ref_nms(boxes.tolist(), scores.tolist(), thr)
    assert 0 < len(keep) < 200  # the data actually exercises suppression
    assert nms(boxes, scores, thr, max_keep=5).tolist() == keep[:5].tolist()


def test_nms_edge_cases():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5]], dtype=float)
    # identical boxes: the higher score wins; equal scores keep input order;
    # zero-area boxes overlap nothing
    assert nms(boxes, np.array([0.5, 0.9, 0.7, 0.7]), 0.5).tolist() == [1, 2, 3]
    # an inverted box (x2 < x1, negative area) overlaps nothing either
    inverted = np.array([[0.0, 0, 10, 10], [50, 0, 0, 10]])
    assert nms(inverted, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    # many equal scores (numpy's default sort would reorder them): the first box wins
    same = np.tile([[0.0, 0, 10, 10]], (100, 1))
    assert nms(same, np.zeros(100), 0.5).tolist() == [0]
    # IoU exactly at the threshold is not suppressed (suppression needs IoU > thr)
    half = np.array([[0.0, 0, 10, 10], [0, 0, 10, 5]])
    assert nms(half, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(half, np.array([0.9, 0.8]), 0.49).tolist() == [0]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("multi_label", [True, False])
def test_multiclass_nms_matches_reference(seed, multi_label):
    rng = np.random.default_rng(100 + seed)
    n, n_cls = 150, 4
    boxes = clustered_boxes(rng, n)
    scores = rng.random((n, n_cls)) ** 3  # many below conf
    bs = np.concatenate([boxes, scores], axis=1)
    got = multiclass_nms(bs, conf_thres=0.2, iou_thres=0.5, multi_label=multi_label, max_det=1000)
    want = ref_multiclass_nms(bs, 0.2, 0.5, multi_label, 1000)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.allclose(got, want, atol=1e-4)
    assert np.all(np.diff(got[:, 4]) <= 0)  # sorted by score
    capped = multiclass_nms(bs, conf_thres=0.2, iou_thres=0.5, multi_label=multi_label, max_det=7)
    assert np.allclose(capped, want[:7], atol=1e-4)


def test_multiclass_nms_is_class_aware():
    box = [10, 10, 50, 50]
    bs = np.array([box + [0.9, 0.0, 0.0], box + [0.0, 0.0, 0.8], box + [0.7, 0.0, 0.0]], dtype=np.float32)
    out = multiclass_nms(bs, conf_thres=0.1, iou_thres=0.5)
    # same box, different classes: both survive; same class: suppressed
    assert np.allclose(out[:, 4:], [[0.9, 0], [0.8, 2]])
    # multi-label: one box becomes one detection per class above threshold
    two = np.array([box + [0.6, 0.5, 0.05]], dtype=np.float32)
    assert multiclass_nms(two, conf_thres=0.1)[:, 5].tolist() == [0, 1]
    assert multiclass_nms(two, conf_thres=0.1, multi_label=False)[:, 5].tolist() == [0]


def test_multiclass_nms_class_offset_with_negative_coordinates():
    # decoded boxes can extend past the image (negative coords); classes must still not interact
    # (an offset of class * (max + 1) would shift class 1 onto class 0 here)
    bs = np.array([[-100, -100, 10, 10, 0.9, 0.0], [-100, -100, 10, 10, 0.0, 0.8]], dtype=np.float32)
    assert multiclass_nms(bs, conf_thres=0.1, iou_thres=0.5).shape == (2, 6)


def test_multiclass_nms_empty_nonfinite_and_candidates():
    assert multiclass_nms(np.zeros((10, 6), np.float32)).shape == (0, 6)
    bs = np.array([[0, 0, np.inf, 10, 0.9, 0.0], [0, 0, 10, 10, 0.5, 0.0]], dtype=np.float32)
    assert multiclass_nms(bs).tolist() == [[0, 0, 10, 10, 0.5, 0]]
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1000, (500, 2))
    bs = np.concatenate([boxes, boxes + 5, rng.random((500, 1))], axis=1)  # disjoint tiny boxes
    out = multiclass_nms(bs, max_candidates=50, max_det=1000)
    assert len(out) == 50 and np.allclose(np.sort(out[:, 4]), np.sort(bs[:, 4])[-50:])


def test_postprocess_batch_and_settings():
    batch = np.zeros((3, 5, 6), np.float32)
    batch[1, 0] = [0, 0, 10, 10, 0.5, 0.9]
    outs = postprocess_batch(batch, PostprocessSettings())
    assert [len(o) for o in outs] == [0, 2, 0]
    with pytest.raises(ValueError, match="iou_thres"):
        PostprocessSettings(iou_thres=0)
    with pytest.raises(ValueError, match="max_det"):
        PostprocessSettings(max_det=0)


# ---------------------------------------------------------------- decoders

def test_decode_yolov5_hand_made():
    out = np.array([[[100, 50, 20, 10, 0.5, 0.2, 0.8], [0, 0, 4, 2, 1.0, 1.0, 0.0]]], dtype=np.float32)
    dec = decode_yolov5(out)
    assert dec.shape == (1, 2, 6) and dec.dtype == np.float32
    assert np.allclose(dec[0, 0], [90, 45, 110, 55, 0.1, 0.4])
    assert np.allclose(dec[0, 1], [-2, -1, 2, 1, 1.0, 0.0])


def naive_decode_yolox(output, input_hw, strides=(8, 16, 32)):
    out = np.zeros(output.shape[:2] + (output.shape[2] - 1,))
    for b in range(output.shape[0]):
        row = 0
        for s in strides:
            for gy in range(input_hw[0] // s):
                for gx in range(input_hw[1] // s):
                    p = output[b, row]
                    cx, cy = (p[0] + gx) * s, (p[1] + gy) * s
                    w, h = math.exp(p[2]) * s, math.exp(p[3]) * s
                    out[b, row, :4] = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
                    out[b, row, 4:] = p[4] * p[5:]
                    row += 1
    return out


def test_decode_yolox_matches_naive_loop():
    rng = np.random.default_rng(7)
    rows = 8 * 12 + 4 * 6 + 2 * 3  # 64x96 input, strides 8/16/32
    raw = rng.normal(0, 1, (2, rows, 5 + 3)).astype(np.float32)
    raw[..., 4:] = rng.random((2, rows, 4))
    dec = decode_yolox(raw, (64, 96))
    assert dec.shape == (2, rows, 4 + 3)
    assert np.allclose(dec, naive_decode_yolox(raw, (64, 96)), rtol=1e-5, atol=1e-3)


def test_decode_yolox_rejects_wrong_grid():
    with pytest.raises(ModelError, match="126"):
        decode_yolox(np.zeros((1, 125, 8), np.float32), (64, 96))


def test_check_output_shape():
    check_output_shape([1, 25200, 85], (640, 640), "yolov5")
    check_output_shape(["batch", 3549, 85], (416, 416), "yolox")
    check_output_shape(["batch", "boxes", 85], (416, 416), "yolox")  # dynamic axes are not checked
    cases = [
        (([1, 25200, 85], (640, 640), "yolov8"), "yolov5"),
        (([1, 25200, 85, 1], (640, 640), "yolov5"), "3-D"),
        (([1, 25200, 5], (640, 640), "yolov5"), "5 \\+ number of classes"),
        (([1, 84, 8400], (640, 640), "yolov5"), "transposed"),
        (([1, 3549, 85], (640, 640), "yolox"), "8400"),
        (([1, 25200, 85], (640, 640), "yolox"), "arch: yolov5"),
        (([1, 8400, 85], (640, 640), "yolov5"), "arch: yolox"),
    ]
    for args, message in cases:
        with pytest.raises(ModelError, match=message):
            check_output_shape(*args)
