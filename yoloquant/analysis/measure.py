"""Measuring one QDQ variant of the model: its mAP on the analysis images, its raw head outputs."""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
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
    map50_95: Optional[float]  # None when only the proxy was measured
    map50: Optional[float]
    detections: Optional[int]
    heads: list  # per proxy image, the head tensors
    seconds: float


class Runner:
    """Runs ONNX variants of one model on the cached images: mAP and head outputs.

    Thread-safe: two variants may be measured at once (ONNX Runtime releases the GIL, so one
    variant's forward passes overlap the other's NMS); pycocotools runs under a lock because
    it redirects the process-wide stdout.
    """

    _coco_lock = threading.Lock()

    def __init__(self, images: EvalImages, head_names: list[str], threads: Optional[int] = None):
        self.images, self.head_names, self.threads = images, head_names, threads

    def measure(self, model: onnx.ModelProto, with_map: bool = True) -> Measurement:
        from ..metrics import CocoEvaluator
        from ..preprocess import boxes_to_original

        start = time.perf_counter()
        model = _with_outputs(model, self.head_names)
        backend = OnnxRuntimeBackend.from_model(model, threads=self.threads)
        batch = backend.input_shape[0]
        batch = batch if isinstance(batch, int) and batch > 1 else 1  # a fixed batch is filled
        first = backend.output_name
        count = len(self.images) if with_map else self.images.proxy_count
        heads, detections = [], []
        for i in range(count):
            x = self.images.tensors[i][None]
            if batch > 1:
                x = np.repeat(x, batch, axis=0)
            wanted = [first] + (self.head_names if i < self.images.proxy_count else [])
            outs = backend.session.run(wanted, {backend.input_name: x})
            if i < self.images.proxy_count:
                heads.append([o[:1] for o in outs[1:]])
            if with_map:
                dets = self.images.decoder(outs[0][:1])[0]
                cls = dets[:, 5].astype(np.int64)
                # out-of-range classes stay: CocoEvaluator reports a model/data mismatch
                dets = dets[np.isin(cls, self.images.scored_classes)
                            | (cls >= len(self.images.category_ids))]
                dets[:, :4] = boxes_to_original(dets[:, :4], self.images.infos[i])
                detections.append(dets)
        result = Measurement(None, None, None, heads, 0.0)
        if with_map:
            with self._coco_lock:
                evaluator = CocoEvaluator(self.images.anno_path, self.images.category_ids)
                for image_id, dets in zip(self.images.image_ids, detections):
                    evaluator.add(image_id, dets)
                stats = evaluator.summarize(self.images.image_ids)
            result.map50_95, result.map50 = float(stats["map50_95"]), float(stats["map50"])
            result.detections = int(stats["detections"])
        result.seconds = time.perf_counter() - start
        return result


class _QuietQDQ(logging.Filter):
    """Drops the QDQ writer's per-model INFO notes: a sweep builds over a hundred variants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.module != "qdq"


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


def noise_ratio(reference: list, heads: list) -> float:
    """Noise power / signal power of `heads` against `reference` (per image, a list of head
    tensors), averaged over the head tensors: each detection scale counts the same, although
    the stride-8 one has 16x the cells of the stride-32 one."""
    ratios = []
    for k in range(len(reference[0]) if reference else 0):
        signal = noise = 0.0
        for ref_img, got_img in zip(reference, heads):
            r64 = ref_img[k].astype(np.float64)
            signal += float(np.sum(r64 * r64))
            noise += float(np.sum((got_img[k].astype(np.float64) - r64) ** 2))
        ratios.append(noise / signal if signal > 0 else 0.0)
    return float(np.mean(ratios)) if ratios else 0.0


def snr_db(nsr: Optional[float]) -> Optional[float]:
    if nsr is None:
        return None
    return 10.0 * math.log10(1.0 / nsr) if nsr > 0 else 300.0  # 300 dB: bit-identical

