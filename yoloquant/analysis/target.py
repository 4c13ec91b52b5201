"""The target search: the fewest of the most sensitive convs kept float that meet target_metric."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import onnx

from ..config import Config
from ..errors import ConfigError
from ..fileio import write_json, write_text
from ..provenance import Timer
from ..stats import Interval, paired_delta
from .files import SKIP_YAML, TARGET_DIR
from .measure import Runner

log = logging.getLogger("yoloquant")


def search_prefix(evaluate: Callable[[int], float], n: int, target: float,
                  known: dict) -> tuple[int, dict]:
    """Smallest k in 0..n with evaluate(k) >= target, by bisection over the ranking's prefixes.

    Assumes keeping more of the most sensitive convs float does not lower the mAP (roughly
    true; the final model is measured again). known: k -> mAP already measured (0 and n).
    """
    scores = dict(known)

    def score(k):
        if k not in scores:
            scores[k] = evaluate(k)
        return scores[k]

    if score(0) >= target:
        return 0, scores
    lo, hi = 0, n  # score(lo) < target <= score(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if score(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, scores

TARGET_MISSING = ("get_target_quant_model is true but target_metric and target_drop are null: "
                  "set the mAP@0.5:0.95 the model must reach (target_metric, e.g. the float mAP "
                  "minus 0.005) or the points it may lose against float (target_drop, e.g. 0.5)")


def target_of(cfg: Config, float_map: float) -> float:
    """The mAP@0.5:0.95 the searched model must reach on the analysis images."""
    if cfg.target_drop is not None:
        return float_map - cfg.target_drop / 100.0
    return cfg.target_metric


def _check_target(cfg: Config, float_map: float, images: int) -> None:
    if not cfg.get_target_quant_model:
        return
    if cfg.target_metric is None and cfg.target_drop is None:
        raise ConfigError(TARGET_MISSING)
    if cfg.target_drop is not None:
        return
    if cfg.target_metric > float_map:
        raise ConfigError(f"target_metric {cfg.target_metric:.4f} is above the float model's "
                          f"mAP@0.5:0.95 {float_map:.4f} on the {images} analysis images: no "
                          f"quantized model can reach it. Set target_metric to at most "
                          f"{float_map:.4f} (e.g. {max(float_map - 0.005, 0.0):.4f}, half a point "
                          "below float)")


def noise_warning(target_offset: float, all_int8: Interval, images: int) -> Optional[str]:
    """Why a missed target may be noise: `all_int8` is the deployed all-int8 model's mAP minus
    the float model's on the analysis images (paired interval), `target_offset` the target
    minus the float mAP. When the interval reaches the target, these images cannot tell
    whether any conv has to stay float (yolov5n, 64 images: all-int8 missed a target 1 point
    below float by 0.02 points and the search kept 31 convs float)."""
    if all_int8.value >= target_offset or all_int8.hi < target_offset:
        return None
    return (f"the all-int8 model misses the target by {100 * (target_offset - all_int8.value):.2f} "
            f"points, but its difference to float on these {images} images, "
            f"{all_int8.points()} points (95% paired interval), reaches the target's "
            f"{100 * target_offset:+.2f}: the images cannot tell whether any conv needs to stay "
            "float. The search goes on; judge the saved model on other images (bench/hard_case.py "
            "does), or raise analysis_max_images or target_drop")


def find_target_model(cfg: Config, cal, runner: Runner, rows: list[dict], reference: dict,
                      timer: Timer) -> dict:
    """Smallest prefix of the ranking kept float that meets target_metric, saved like
    post_quant.py (Paddle int8 model + QDQ ONNX + summary.json) with its skip list."""
    from ..deploy_onnx import build_qdq
    from ..ptq import QDQ_ONNX, SUMMARY, quantize

    start = time.perf_counter()
    target = target_of(cfg, reference["float_map"])
    order = [r["onnx_node"] for r in rows]
    evaluations = []

    runs = {}

    def evaluate(k: int) -> float:
        # the layout the saved model will have (deploy_backend), not the ranking's conv-only
        # one: int8 glue between the convs adds its own error, and a search on the conv-only
        # layout overestimated what the saved model reaches (yolov5n hard case: 0.3226
        # searched, 0.3170 saved), then walked one conv at a time
        runs[k] = runner.measure(build_qdq(cal, order[:k]), with_map=True)
        m = runs[k].map50_95
        evaluations.append(k)
        log.info("target search: %d most sensitive conv(s) float -> mAP %.4f (target %.4f)",
                 k, m, target)
        return m

    n = len(order)
    known = {0: evaluate(0)}
    all_int8 = warning = None
    if known[0] < target and runs[0].matches is not None:
        float_run = runner.measure(cal.onnx_model, with_map=True)
        all_int8 = paired_delta(float_run.matches, runs[0].matches).map50_95
        warning = noise_warning(target - float_run.map50_95, all_int8, len(runner.images))
        if warning:
            log.warning(warning)
    # all-int8 already meeting the target ends the search before anything is kept float
    if known[0] < target:
        known[n] = evaluate(n)
    if known[0] < target and known[n] < target:
        raise ConfigError(f"even with all {n} analysed convs float the mAP is {known[n]:.4f}, below "
                          f"target_metric {target:.4f}: widen analysis_layers (null: every conv) or "
                          "lower target_metric")
    k, scores = search_prefix(evaluate, n, target, known)
    names = cal.onnx_to_paddle()
    out_dir = Path(cfg.save_dir) / TARGET_DIR
    user_skip = list(cfg.skip_tensor_list or [])
    while True:
        skip = user_skip + [names[node] for node in order[:k]]
        with timer("target_quantize"):
            # the automatic float choices stay off, as in the sweep: the saved model is the
            # one the search measured
            saved = quantize(dataclasses.replace(cfg, skip_tensor_list=skip or None,
                                                 min_layer_snr_db=None, keep_regression_float=False),
                             out_dir, algo=cal.algo)
        confirmed = runner.measure(onnx.load(str(out_dir / QDQ_ONNX)), with_map=True)
        evaluations.append("saved")
        if confirmed.map50_95 >= target or k >= n:
            break
        # the saved model lands below the bisection's: keep one more conv float
        log.warning("the saved model measures %.4f < target %.4f: keeping one more conv float",
                    confirmed.map50_95, target)
        k += 1
    found = {"target": target, "target_drop": cfg.target_drop, "float_layers": order[:k],
             "skip_tensor_list": skip,
             "searched_map": scores.get(k), "confirmed_map": confirmed.map50_95,
             "confirmed_map50": confirmed.map50, "met": confirmed.map50_95 >= target,
             "evaluations": {str(key): v for key, v in sorted(scores.items())},
             "full_evaluations": len(evaluations),
             # the deployed all-int8 model minus float on the analysis images, when it missed
             "all_int8_delta": None if all_int8 is None else
             {"delta": all_int8.value, "ci95": [all_int8.lo, all_int8.hi],
              "reaches_target": warning is not None},
             "save_dir": str(out_dir), "seconds": round(time.perf_counter() - start, 2)}
    saved.summary["analysis"] = {
        "target_metric": target, "eval_images": len(runner.images),
        "eval_anno_path": str(runner.images.anno_path), "float_map": reference["float_map"],
        "int8_map": reference["int8_map"], "map": confirmed.map50_95,
        "float_layers": found["float_layers"]}
    write_json(out_dir / SUMMARY, saved.summary)
    snippet = (f"# analysis.py: the fewest convs kept float for mAP@0.5:0.95 >= {target:.4f} on "
               f"{len(runner.images)} images of {runner.images.anno_path.name}\n"
               f"# measured {confirmed.map50_95:.4f} (float {reference['float_map']:.4f}, all int8 "
               f"{reference['int8_map']:.4f}); paste into a post_quant.py config:\n"
               f"skip_tensor_list: {json.dumps(skip)}\n"
               "# the convs analysis.py measured were chosen with the automatic float choices off:\n"
               "min_layer_snr_db: null\nkeep_regression_float: false\n")
    write_text(Path(cfg.save_dir) / SKIP_YAML, snippet)
    if not found["met"]:
        log.warning("no model met target_metric %.4f; the saved one keeps every analysed conv "
                    "float", target)
    timer.seconds["target_search"] = found["seconds"]
    return found

