"""eval.py on a Ray cluster: the images sharded over workers, scored once on the driver.

Each worker (a Ray actor) opens the model once and runs contiguous shards of the data set,
batched exactly as the single-process loop batches them (validator.batch_detections); the
driver adds every image's detections to one CocoEvaluator and scores them with the same
protocol, so the mAP equals the single-process run's to the last digit.

Data paths: every node reads the images from the config's paths (they must exist at the same
path on every node, e.g. a shared file system). An ONNX model is shipped by the driver (its bytes
go through Ray's object store); a Paddle model folder or an OpenVINO run reads the model from
its path on the worker.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..runtime import OnnxRuntimeBackend, OpenVinoBackend, PaddleInferenceBackend
from ..validator import EvalResult, _model_batch, batch_detections, scored
from .cluster import Cluster, put, run_on_actors

TASKS_PER_WORKER = 4  # shards per worker: a progress bar that moves, a slow node evened out


def recipe_of(backend) -> tuple:
    """How a worker opens the same model as `backend`: a small picklable description."""
    if isinstance(backend, OnnxRuntimeBackend):
        if backend.path is None:
            raise ConfigError("an in-memory ONNX model cannot be evaluated on a Ray cluster")
        return ("onnxruntime", put(backend.path.read_bytes()), backend.name)
    if isinstance(backend, OpenVinoBackend):
        return ("openvino", str(backend.path), backend.name)
    if isinstance(backend, PaddleInferenceBackend):
        int8 = backend.name.endswith("(onednn-int8)")
        mkldnn = int8 or backend.name.endswith("(onednn-fp32)")
        return ("paddle", backend.files, (int8, mkldnn), backend.name)
    raise ConfigError(f"the {getattr(backend, 'name', type(backend).__name__)} backend cannot "
                      "run on a Ray cluster")


def open_recipe(recipe: tuple, threads: int):
    kind = recipe[0]
    if kind == "onnxruntime":
        import onnx
        import ray

        model = onnx.load_model_from_string(ray.get(recipe[1]))
        return OnnxRuntimeBackend.from_model(model, threads=threads, name=recipe[2])
    if kind == "openvino":
        return OpenVinoBackend(recipe[1], threads=threads)
    files, (int8, mkldnn), name = recipe[1], recipe[2], recipe[3]
    backend = PaddleInferenceBackend(files, int8=int8, mkldnn=mkldnn, threads=threads)
    backend.name = name  # e.g. the labelled float simulation
    return backend


class EvalWorker:
    """One worker's model and data set (the driver's, rebuilt from the same paths)."""

    def __init__(self, recipe: tuple, threads: int, dataset_args: tuple, decoder,
                 batch_size: int):
        from ..data import CocoDetection

        self.backend = open_recipe(recipe, threads)
        self.dataset = CocoDetection(*dataset_args)
        self.decoder, self.batch_size = decoder, batch_size

    def run(self, shard: tuple[int, int]) -> list:
        """[(image id, detections)] of the images shard[0] <= i < shard[1]."""
        from ..data import Batch

        found = []
        for start in range(shard[0], shard[1], self.batch_size):
            samples = [self.dataset.load(i)
                       for i in range(start, min(start + self.batch_size, shard[1]))]
            batch = Batch(images=np.stack([s.tensor for s in samples]),
                          infos=[s.info for s in samples],
                          image_ids=[s.image_id for s in samples],
                          file_names=[s.file_name for s in samples])
            found.extend(batch_detections(self.backend, batch, self.decoder, self.batch_size))
        return found


def shards(n: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, each a whole number of batches (the last may be
    short), about TASKS_PER_WORKER per worker: the single-process run's batches exactly."""
    batches = math.ceil(n / batch_size)
    per = max(1, math.ceil(batches / (workers * TASKS_PER_WORKER)))
    step = per * batch_size
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def evaluate_on_cluster(cluster: Cluster, backend, dataset, decoder, batch_size: int = 1,
                        desc: str = "eval", progress: bool = True) -> EvalResult:
    """validator.evaluate, with the forward passes on the cluster's workers."""
    from ..metrics import CocoEvaluator

    batch_size = _model_batch(backend, batch_size)
    evaluator = CocoEvaluator(dataset.anno_path, dataset.category_ids)
    start = time.perf_counter()
    # absolute: a worker on another node does not start in the driver's directory
    dataset_args = (Path(dataset.image_dir).resolve(), Path(dataset.anno_path).resolve(),
                    dataset.preprocess, None, dataset.image_ids)
    parts = shards(len(dataset), batch_size, cluster.workers)
    for _, found in run_on_actors(cluster, EvalWorker,
                                  (recipe_of(backend), cluster.threads, dataset_args, decoder,
                                   batch_size),
                                  parts, desc=f"{desc} on Ray", unit="shards", progress=progress):
        for image_id, dets in found:
            evaluator.add(image_id, dets)
    return scored(evaluator, dataset, backend.name, time.perf_counter() - start)

