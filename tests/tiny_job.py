"""A complete job on disk for the command-line tests: the tiny synthetic detector of
test_ptq, COCO train/val splits of random images, and a config file pointing at them."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from test_ptq import tiny_yolo_onnx  # pytest puts tests/ on sys.path

ROOT = Path(__file__).resolve().parent.parent


def write_split(root: Path, split: str, n: int = 6, seed: int = 3) -> None:
    rng = np.random.default_rng(seed + len(split))
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{split}{i}.jpg"
        cv2.imwrite(str(root / split / name), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2,
                            "bbox": [8, 8, 20, 24], "area": 480, "iscrowd": 0})
    (root / f"{split}.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))


def make_job(root: Path, **overrides) -> Path:
    """Writes model, data and config under root; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "tiny.onnx").is_file():
        tiny_yolo_onnx(root / "tiny.onnx")
        write_split(root, "train")
        write_split(root, "val")
    raw = {"model_dir": str(root / "tiny.onnx"), "dataset_dir": str(root),
           "train_image_dir": "train", "train_anno_path": "train.json", "val_image_dir": "val",
           "val_anno_path": "val.json", "cache_dir": str(root / "cache"),
           "analysis_max_images": 4, "analysis_proxy_images": 2, "save_dir": str(root / "analysis"),
           "PTQ": {"algo": "avg", "batch_nums": 4}}
    raw.update(overrides)
    path = root / f"job{len(list(root.glob('job*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def relu_onnx(path: Path) -> None:
    """A valid ONNX model that is not a detector: one Relu."""
    graph = helper.make_graph([helper.make_node("Relu", ["images"], ["out"])], "relu",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 64, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def conv_relu_onnx(path: Path) -> None:
    """A Conv + Relu graph (X2Paddle converts it): quantizable, but not a detector either."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["out"])], "conv_relu",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 64, 64])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run_script(script: str, *args, env=None, preexec_fn=None, timeout=600):
    """One of the repository's scripts, as a user runs it from the repository root."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          preexec_fn=preexec_fn)


def without_permission_override() -> None:
    """preexec_fn: the child is subject to file permission bits as a non-root user is.

    Tests run as root, who may write anywhere. Dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the capability bounding set before exec leaves the child root
    without them, so a folder's mode 0555 stops it as it stops any user. (A non-root test run
    needs nothing: permissions already apply.)"""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
