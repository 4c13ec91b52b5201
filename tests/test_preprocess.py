import numpy as np
import pytest

from yoloquant.preprocess import LetterboxInfo, Preprocess, boxes_to_original, letterbox

BOXES = np.array([[20, 30, 120, 90], [150, 10, 290, 200], [5, 180, 60, 195]], dtype=np.float64)


def draw(h, w, boxes):
    """Grey image with each box filled in its own colour (so each can be found again)."""
    img = np.full((h, w, 3), 40, np.uint8)
    colours = []
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        colour = (200, 60 + 60 * k, 250 - 70 * k)
        img[y1:y2, x1:x2] = colour
        colours.append(colour)
    return img, colours


def found_box(tensor, colour, spec):
    """Bounding box, in input pixels, of the pixels close to `colour` in the tensor."""
    bgr = tensor[::-1] if spec.channel_order == "RGB" else tensor
    pixels = bgr.transpose(1, 2, 0) / spec.scale
    mask = np.all(np.abs(pixels - np.array(colour)) < 20, axis=2)
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("pad_mode", ["center", "top_left"])
@pytest.mark.parametrize("orig_hw", [(210, 300), (300, 210), (50, 70), (640, 640)], ids=["wide", "tall", "upscaled", "exact"])
@pytest.mark.parametrize("input_hw", [(160, 160), (128, 192)], ids=["square", "rect"])
def test_boxes_map_back_to_original(pad_mode, orig_hw, input_hw):
    h, w = orig_hw
    boxes = BOXES * np.array([w / 300, h / 210, w / 300, h / 210])  # keep boxes inside any image shape
    img, colours = draw(h, w, boxes)
    spec = Preprocess(input_hw, pad_mode=pad_mode)
    tensor, info = letterbox(img, spec)
    assert tensor.shape == (3,) + input_hw and tensor.dtype == np.float32
    assert (info.orig_h, info.orig_w) == (h, w)
    assert info.ratio == pytest.approx(min(input_hw[0] / h, input_hw[1] / w))
    found = np.stack([found_box(tensor, c, spec) for c in colours])
    back = boxes_to_original(found, info)
    # edges blur by ~1 input pixel when resizing, i.e. 1/ratio original pixels
    assert np.abs(back - boxes).max() <= 1.5 / info.ratio + 1


@pytest.mark.parametrize("orig_hw", [(210, 300), (300, 210), (123, 457), (457, 123)])
def test_pad_placement(orig_hw):
    h, w = orig_hw
    img = np.full((h, w, 3), 250, np.uint8)
    for pad_mode in ("center", "top_left"):
        spec = Preprocess((160, 160), pad_mode=pad_mode, pad_value=0, scale=1.0)
        tensor, info = letterbox(img, spec)
        content = tensor[0] > 100
        ys, xs = np.nonzero(content)
        new_w, new_h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        assert (xs.min(), ys.min()) == (info.pad_x, info.pad_y)
        assert (new_w, new_h) == (round(w * info.ratio), round(h * info.ratio))
        if pad_mode == "top_left":
            assert (info.pad_x, info.pad_y) == (0, 0)
        else:
            # YOLOv5 splits the pad with round(d/2 - 0.1) left/top, round(d/2 + 0.1) right/bottom
            dw, dh = (160 - new_w) / 2, (160 - new_h) / 2
            assert (info.pad_x, info.pad_y) == (round(dw - 0.1), round(dh - 0.1))
            assert 160 - new_w - info.pad_x == round(dw + 0.1)
            assert 160 - new_h - info.pad_y == round(dh + 0.1)
        # everything outside the content is pad
        assert np.all(tensor[:, ~content] == 0)


def test_channel_order_scale_and_pad_value():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:] = (10, 20, 30)  # B, G, R
    rgb, info = letterbox(img, Preprocess((80, 80)))
    assert np.allclose(rgb[:, 40, 40], np.array([30, 20, 10]) / 255)
    assert np.allclose(rgb[:, 0, 0], 114 / 255)  # center pad: top rows are pad
    assert info.pad_y == 20 and info.pad_x == 0
    bgr, _ = letterbox(img, Preprocess((80, 80), channel_order="BGR", scale=1.0, pad_mode="top_left", pad_value=7))
    assert np.array_equal(bgr[:, 10, 10], [10, 20, 30])
    assert np.array_equal(bgr[:, 79, 10], [7, 7, 7])  # bottom rows are pad


def test_mean_std():
    img = np.full((8, 8, 3), 255, np.uint8)
    spec = Preprocess((8, 8), mean=[0.5, 0.25, 0.0], std=(0.5, 0.25, 2.0))
    tensor, _ = letterbox(img, spec)
    assert np.allclose(tensor[:, 0, 0], [1.0, 3.0, 0.5])
    assert spec.mean == (0.5, 0.25, 0.0)  # lists normalised to tuples (hashable spec)


def test_boxes_to_original_clips_and_keeps_input():
    info = LetterboxInfo(ratio=0.5, pad_x=10, pad_y=0, orig_h=100, orig_w=200)
    boxes = np.array([[0.0, -5, 50, 30], [60, 20, 200, 80]], dtype=np.float32)
    out = boxes_to_original(boxes, info)
    assert np.allclose(out, [[0, 0, 80, 60], [100, 40, 200, 100]])
    assert boxes[0, 0] == 0  # input untouched
    assert boxes_to_original(np.zeros((0, 4)), info).shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(input_size=(640,)), "input_size"),
        (dict(input_size=(0, 640)), "input_size"),
        (dict(input_size=(640.0, 640)), "input_size"),
        (dict(input_size=(640, 640), pad_value=300), "pad_value"),
        (dict(input_size=(640, 640), pad_mode="centre"), "pad_mode"),
        (dict(input_size=(640, 640), channel_order="rgb"), "channel_order"),
        (dict(input_size=(640, 640), scale=0), "scale"),
        (dict(input_size=(640, 640), mean=(1, 2)), "mean"),
        (dict(input_size=(640, 640), std=(1, 0, 1)), "std"),
    ],
)
def test_invalid_spec(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Preprocess(**kwargs)


def test_invalid_spec_lists_choices():
    with pytest.raises(ValueError, match="top_left"):
        Preprocess((640, 640), pad_mode="bottom")


def test_letterbox_rejects_non_bgr_uint8():
    spec = Preprocess((32, 32))
    with pytest.raises(ValueError, match="uint8"):
        letterbox(np.zeros((10, 10, 3), np.float32), spec)
    with pytest.raises(ValueError, match=r"\(h, w, 3\)"):
        letterbox(np.zeros((10, 10), np.uint8), spec)
