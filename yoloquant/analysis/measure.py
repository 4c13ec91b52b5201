"""Measuring one QDQ variant of the model: its mAP on the analysis images, its raw head outputs."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from ..errors import ModelError
from ..runtime import OnnxRuntimeBackend
from .images import EvalImages

# convs are ranked with Q/DQ around the convs only (the layout every conv runs int8 in, on ONNX
# Runtime): the deployed layouts run some convs float for speed, which would hide their cost
RANK_LAYOUT = "conv_only"


def head_tensors(model: onnx.ModelProto) -> list[str]:
    """Outputs of the convs from which a graph output is reachable through non-Conv ops only:
    the detection head's raw predictions (box and score logits) before any decoding.

    The proxy compares these rather than the decoded output, where pixel box coordinates would
    outweigh the scores.
    """
    graph = model.graph
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in set(n.input):
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    found = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        stack, seen = [conv.output[0]], {conv.output[0]}
        while stack:
            t = stack.pop()
            if t in outputs:
                found.append(conv.output[0])
                break
            for r in readers.get(t, []):
                if r.op_type != "Conv":
                    new = [o for o in r.output if o not in seen]
                    seen.update(new)
                    stack.extend(new)
    return found or [o.name for o in graph.output]


@dataclass
class Measurement:
    map50_95: Optional[float]  # None when the mAP was not measured
    map50: Optional[float]
    detections: Optional[int]
    matches: object  # stats.ImageMatches (the mAP on any subset of the images), or None
    noise: Optional[np.ndarray]  # (noise images, head tensors): squared error against float
    seconds: float


@dataclass
class HeadReference:
    """The float model's head tensors on the noise images, and their power (the signal)."""

    heads: list  # per image, the head tensors
    signal: np.ndarray  # (images, head tensors)


def halves(n: int) -> list[np.ndarray]:
    """Two disjoint halves of n images, interleaved (even / odd positions): what the ranking's
    split-half reproducibility is measured on."""
    return [np.arange(n)[0::2], np.arange(n)[1::2]]


class Runner:
    """Runs ONNX variants of one model on the cached images: mAP, and the noise of the head
    outputs against the float model's (`reference`, set once from the float model).

    Thread-safe: two variants may be measured at once (ONNX Runtime releases the GIL, so one
    variant's forward passes overlap the other's NMS); pycocotools runs under a lock because
    it redirects the process-wide stdout.
    """

    _coco_lock = threading.Lock()

    def __init__(self, images: EvalImages, head_names: list[str], threads: Optional[int] = None,
                 reference: Optional[HeadReference] = None):
        self.images, self.head_names, self.threads = images, head_names, threads
        self.reference = reference

    def reference_of(self, model: onnx.ModelProto) -> HeadReference:
        """The float model's heads on the noise images (kept in memory for every variant)."""
        backend = OnnxRuntimeBackend.from_model(_with_outputs(model, self.head_names),
                                                threads=self.threads)
        heads = [self._run(backend, i, with_heads=True)[1] for i in range(self.images.noise_count)]
        signal = np.array([[float(np.sum(h.astype(np.float64) ** 2)) for h in img] for img in heads])
        return HeadReference(heads, signal)

    def _run(self, backend, i: int, with_heads: bool):
        x = self.images.tensors[i][None]
        batch = backend.input_shape[0]
        if isinstance(batch, int) and batch > 1:  # a fixed batch is filled
            x = np.repeat(x, batch, axis=0)
        wanted = [backend.output_name] + (self.head_names if with_heads else [])
        outs = backend.session.run(wanted, {backend.input_name: x})
        return outs[0][:1], [o[:1] for o in outs[1:]]

    def measure(self, model: onnx.ModelProto, with_map: bool = True) -> Measurement:
        start = time.perf_counter()
        backend = OnnxRuntimeBackend.from_model(_with_outputs(model, self.head_names),
                                                threads=self.threads)
        count = len(self.images) if with_map else self.images.noise_count
        noise = np.zeros((self.images.noise_count, len(self.head_names)))
        detections = []
        for i in range(count):
            with_heads = self.reference is not None and i < self.images.noise_count
            output, heads = self._run(backend, i, with_heads)
            if with_heads:
                noise[i] = [float(np.sum((h.astype(np.float64) - r.astype(np.float64)) ** 2))
                            for h, r in zip(heads, self.reference.heads[i])]
            if with_map:
                detections.append(self._detections(output, i))
        result = Measurement(None, None, None, None, noise if self.reference else None, 0.0)
        if with_map:
            self._score(detections, result)
        result.seconds = time.perf_counter() - start
        return result

    def _detections(self, output: np.ndarray, i: int) -> np.ndarray:
        from ..preprocess import boxes_to_original

        dets = self.images.decoder(output)[0]
        cls = dets[:, 5].astype(np.int64)
        # out-of-range classes stay: CocoEvaluator reports a model/data mismatch
        dets = dets[np.isin(cls, self.images.scored_classes) | (cls >= len(self.images.category_ids))]
        dets[:, :4] = boxes_to_original(dets[:, :4], self.images.infos[i])
        return dets

    def _score(self, detections: list, result: Measurement) -> None:
        from ..metrics import CocoEvaluator

        with self._coco_lock:
            evaluator = CocoEvaluator(self.images.anno_path, self.images.category_ids)
            for image_id, dets in zip(self.images.image_ids, detections):
                evaluator.add(image_id, dets)
            stats = evaluator.summarize(self.images.image_ids)
        result.map50_95, result.map50 = float(stats["map50_95"]), float(stats["map50"])
        result.detections = int(stats["detections"])
        result.matches = evaluator.matches

    def nsr(self, m: Measurement, subset: Optional[np.ndarray] = None) -> float:
        """Noise power / signal power of the head outputs on the noise images (or `subset` of
        them), averaged over the head tensors: each detection scale counts the same, although
        the stride-8 one has 16x the cells of the stride-32 one."""
        idx = slice(None) if subset is None else subset
        signal = self.reference.signal[idx].sum(axis=0)
        noise = m.noise[idx].sum(axis=0)
        return float(np.mean(np.where(signal > 0, noise / np.maximum(signal, 1e-300), 0.0)))

    def nsr_halves(self, m: Measurement) -> list[float]:
        return [self.nsr(m, h) for h in halves(self.images.noise_count)]

    def map_halves(self, m: Measurement) -> Optional[list[float]]:
        """mAP@0.5:0.95 on each half of the analysis images (from the same matches)."""
        if m.matches is None:
            return None
        n = m.matches.images
        weights = np.zeros((2, n))
        for k, h in enumerate(halves(n)):
            weights[k, h] = 1.0
        return [float(v) for v in m.matches.average_precision(weights)[0]]


class _QuietQDQ(logging.Filter):
    """Drops the QDQ writer's per-model INFO notes: a sweep builds over a hundred variants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "qdq" not in Path(record.pathname).parts


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` with `names` also exposed as graph outputs (a copy; the input is not changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output}
    for name in names:
        if name not in produced:
            raise ModelError(f"tensor {name!r} of the float model is missing from a quantized variant; "
                             "the QDQ writer renamed it (the proxy compares head outputs by name)")
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out
