"""The seed's top-level dataset.py and post_process.py, used the way a user's own script uses
them (run from the repository folder, with the seed's call forms), give our implementation:
the same detections and, up to box clipping, the same mAP as eval.py's validator."""
import json
import subprocess
import sys

import numpy as np
import pytest

from yoloquant.config import load_config
from yoloquant.demo_data import ensure_demo_data

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
N = 40

USER_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort
import paddle
from dataset import COCOTrainDataset, COCOValDataset
from post_process import YOLOPostProcess, YOLOv6PostProcess, coco_metric

dataset_dir, anno, model = sys.argv[1:4]
dataset = COCOValDataset(dataset_dir=dataset_dir, image_dir="val/images", anno_path=anno,
                         img_size=[256, 256])
loader = paddle.io.DataLoader(dataset, batch_size=1)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
postprocess = YOLOPostProcess(score_threshold=0.001, nms_threshold=0.65, multi_label=True)
bboxes_list, bbox_nums_list, image_id_list, first = [], [], [], None
for data in loader:
    data_all = {k: np.array(v) for k, v in data.items()}
    outs = session.run(None, {name: data_all["image"]})
    res = postprocess(np.array(outs[0]), data_all["scale_factor"])
    first = first if first is not None else res["bbox"][:5].tolist()
    bboxes_list.append(res["bbox"])
    bbox_nums_list.append(res["bbox_num"])
    image_id_list.append(np.array(data_all["im_id"]))
stats = coco_metric(dataset.ann_file, bboxes_list, bbox_nums_list, image_id_list)
train = COCOTrainDataset(dataset_dir=dataset_dir, image_dir="val/images", anno_path=anno,
                         img_size=[256, 256], input_name=name)
assert YOLOv6PostProcess is YOLOPostProcess
print("RESULT", json.dumps({"map": float(stats[0]), "map50": float(stats[1]), "n": len(dataset),
                            "ids": [int(i) for i in dataset.ids], "first": first,
                            "train_keys": sorted(train[0]), "shape": list(train[0][name].shape)}))
"""


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    data = ensure_demo_data(ROOT / "cache" / "demo_data")
    anno = json.loads((data / "val" / "instances.json").read_text())
    keep = {im["id"] for im in anno["images"][:N]}
    path = tmp_path_factory.mktemp("seed") / "val40.json"
    path.write_text(json.dumps(dict(anno, images=anno["images"][:N],
                                    annotations=[a for a in anno["annotations"] if a["image_id"] in keep])))
    return data, path


def test_a_seed_style_script_gets_our_implementation(subset, tmp_path):
    data, anno = subset
    # run in an empty folder (to see what it leaves), the repository on the path as for a
    # script saved beside post_quant.py
    proc = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(data), str(anno),
                           str(ROOT / "models" / "demo_shapes.onnx")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "Average Precision" in proc.stdout  # COCOeval's table, as the seed printed it
    assert list(tmp_path.iterdir()) == []  # no bbox.json left behind (the seed wrote one)
    assert result["n"] == N and result["train_keys"] == ["images"]
    assert result["shape"] == [3, 256, 256]

    # the same images through eval.py's validator, with the seed's preprocessing
    from yoloquant.evaluate import evaluate_backend
    from yoloquant.runtime import OnnxRuntimeBackend
    from yoloquant.validator import Decoder, postprocess_settings, preprocess_for, val_dataset

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    cfg.dataset_dir, cfg.val_anno_path, cfg.pad_mode = str(data), str(anno), "top_left"
    cfg.model_dir = str(ROOT / cfg.model_dir)
    backend = OnnxRuntimeBackend(cfg.model_dir)
    ours = evaluate_backend(cfg, backend)
    assert ours.images == N and result["ids"] == sorted(result["ids"])
    assert ours.map50_95 > 0.5
    # the same protocol (coco_metric clips to the image as the validator does): the same mAP,
    # up to float32/float64 rounding of box coordinates
    assert abs(result["map"] - ours.map50_95) < 1e-4, (result, ours)
    assert abs(result["map50"] - ours.map50) < 1e-4, (result, ours)
    # detections before clipping: exactly the validator's decoder + NMS, scaled back
    preprocess = preprocess_for(cfg, backend.input_shape)
    sample = val_dataset(cfg, preprocess).load(0)
    dets = Decoder(cfg.output_layout, preprocess.input_size,
                   postprocess_settings(cfg))(backend(sample.tensor[None]))[0][:5]
    expected = np.concatenate([dets[:, 5:6], dets[:, 4:5], dets[:, :4] / sample.info.ratio], axis=1)
    np.testing.assert_allclose(np.array(result["first"]), expected, rtol=1e-5, atol=1e-4)
