"""analysis.py on a Ray cluster: one task per analysed conv.

The driver calibrates and measures the references as in a single-process run, then puts the
calibration (ONNX graph and scales), the preprocessed evaluation images and the float model's
head outputs in Ray's object store once; each task builds the conv's two QDQ variants from them
and measures them with the same Runner, so the numbers equal the single-process run's. Nothing
is read from disk on the workers: only the code must be importable there.

The driver writes the checkpoint as results arrive (analysis/job.py), so a stopped driver loses
only the tasks in flight and `--resume` continues; a task whose worker dies is run again
elsewhere (distributed.cluster.TASK_RETRIES).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

from ..provenance import Timer
from .cluster import Cluster, TaskFailed, put, run_tasks


def measure_layer(node: str, cal, images, reference, heads: list, with_map: bool, both: bool,
                  threads: int) -> dict:
    """One conv's checkpoint entry (analysis.job._directions), measured in this worker."""
    from ..analysis.job import _directions
    from ..analysis.measure import RANK_LAYOUT, Runner
    from ..deploy_onnx import build_qdq

    start = time.perf_counter()
    runner = Runner(images, heads, threads, reference)
    others = [p.node_name for p in cal.conv_params if p.node_name != node]
    only = runner.measure(build_qdq(cal, others, backend=RANK_LAYOUT), with_map)
    but = runner.measure(build_qdq(cal, [node], backend=RANK_LAYOUT), with_map) if both else None
    result = _directions(runner, only, but)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def slim_calibration(cal):
    """What building a conv_only QDQ variant needs (graph, scales, names), without the Paddle
    program and the calibration images (a resumed calibration has neither)."""
    return dataclasses.replace(cal, converted=None, ptq=None, images=[], timer=Timer(),
                               tensor_ranges={}, placement=None)


def measure_on_cluster(cluster: Cluster, cal, images, reference, heads: list, todo: list,
                       with_map: bool, both: bool) -> Iterator[tuple[str, dict]]:
    """(conv node, its result) for every node of `todo`, in the order they finish."""
    shared = [put(slim_calibration(cal)), put(images), put(reference)]
    try:
        for i, result in run_tasks(cluster, measure_layer, todo, *shared, heads, with_map, both,
                                   cluster.threads, desc="sensitivity", unit="layers",
                                   progress=False):
            yield todo[i], result
    except TaskFailed as exc:
        raise TaskFailed(f"{exc}; the checkpoint in {cal.cfg.save_dir} keeps every layer "
                         "finished: run again with --resume to continue") from None
