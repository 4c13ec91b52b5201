"""The analysis.py job: calibrate once, measure every conv, rank, report, search the target."""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import joblog
from ..config import Config, require
from ..errors import ConfigError
from ..fileio import check_writable, temporary_dir, write_json
from ..provenance import Timer, file_sha256
from ..runtime import OnnxRuntimeBackend, default_threads
from ..stats import snr_db
from .checkpoint import (CHECKPOINT_FORMAT, _fingerprint, _fingerprint_diff, load_calibration,
                         save_calibration)
from .files import (CALIBRATION, CHECKPOINT, HIST_PNG, PROXY_PNG, RANK_CSV, RANK_JSON, RANK_PNG,
                    RANK_TXT, SKIP_YAML, SPLIT_PNG, STAT_CSV, TARGET_DIR)
from .images import load_eval_images
from .measure import RANK_LAYOUT, Runner, _QuietQDQ, head_tensors
from .ranking import correlations, rank_layers
from .report import _pt, _short, _write_outputs
from .statistics import layer_statistics
from .target import TARGET_MISSING, _check_target, find_target_model

log = logging.getLogger("yoloquant")


PARALLEL_VARIANTS = 2  # variants measured at once (the two directions of a layer)


@dataclass
class AnalysisResult:
    save_dir: Path
    complete: bool
    rows: list = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    spearman: dict = field(default_factory=dict)
    target: Optional[dict] = None
    seconds: dict = field(default_factory=dict)


def _resolve_layers(cfg: Config, cal) -> list[str]:
    order = [p.node_name for p in cal.conv_params]
    if not cfg.analysis_layers:
        return order
    to_onnx = cal.paddle_to_onnx
    chosen, known = set(), order + list(to_onnx)
    for name in cfg.analysis_layers:
        node = to_onnx.get(name, name)
        if node not in order:
            if name in cal.user_skip or name in cal.user_skip.values():
                raise ConfigError(f"analysis_layers names {name!r}, which skip_tensor_list keeps "
                                  "float: remove it from one of the two lists")
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(order[:3])}"
            raise ConfigError(f"analysis_layers names {name!r}, which is not a quantized conv of "
                              f"this model ({hint})")
        chosen.add(node)
    return [n for n in order if n in chosen]


def run_analysis(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
                 progress: bool = True, threads: Optional[int] = None,
                 cluster=None) -> AnalysisResult:
    """Rank the convs by sensitivity; write the outputs into cfg.save_dir; optionally search the
    target model.

    stop_after: analyse at most this many layers in this call, then return an incomplete result
    (a checkpointed stop, as after a kill; `resume=True` continues).
    cluster: a distributed.Cluster measuring the convs as Ray tasks (same results).
    """
    from ..deploy_onnx import build_qdq
    from ..ptq import calibrate

    require(cfg, "model_dir", "save_dir")
    if cfg.get_target_quant_model and cfg.target_metric is None and cfg.target_drop is None:
        # fail now, not after the sweep
        raise ConfigError(TARGET_MISSING)
    timer = Timer()
    started = time.perf_counter()
    save = Path(cfg.save_dir)
    check_writable(save)  # created with the first result (the calibration), not before
    if save.is_dir():
        joblog.attach(save / joblog.RUN_LOG)
    probe = OnnxRuntimeBackend(cfg.model_dir, threads=threads)
    with timer("load_images"):
        images = load_eval_images(cfg, probe.input_shape)
    fingerprint = _fingerprint(cfg, file_sha256(cfg.model_dir), images.image_ids)

    checkpoint = None
    if resume and (save / CHECKPOINT).is_file():
        try:
            checkpoint = json.loads((save / CHECKPOINT).read_text())
        except ValueError as exc:
            raise ConfigError(f"{save / CHECKPOINT} is not valid JSON ({exc}); run without --resume "
                              "to start over") from exc
        diff = _fingerprint_diff(checkpoint.get("fingerprint", {}), fingerprint)
        if diff:
            raise ConfigError(f"the checkpoint in {save} was made with a different model, data or "
                              f"config (differs: {', '.join(diff)}); run without --resume to start "
                              "over, or use another save_dir")
        cal = load_calibration(cfg, save / CALIBRATION)
        if cfg.get_target_quant_model and not cal.tensor_ranges:  # fail now, not after the sweep
            raise ConfigError(f"{save / CALIBRATION} has no tensor ranges (an older version wrote "
                              "it) and the target search needs them: run without --resume")
        log.info("resuming: %d of %d layers already analysed in %s", len(checkpoint["results"]),
                 len(checkpoint["layers"]), save / CHECKPOINT)
    else:
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", save)
        elif (save / CHECKPOINT).is_file():
            log.info("starting over (pass --resume to continue the checkpoint in %s)", save)
        with temporary_dir("yoloquant-analysis.") as work, timer("calibrate"):
            # once: every variant below reuses these scales. post_quant's automatic float
            # choices are off: this tool measures every conv and makes that choice itself.
            cal = calibrate(dataclasses.replace(cfg, min_layer_snr_db=None,
                                                keep_regression_float=False), work)
        save_calibration(cal, save / CALIBRATION)
        joblog.attach(save / joblog.RUN_LOG)

    heads = head_tensors(cal.onnx_model)
    # two variants at a time, each on half the cores: forward passes overlap NMS and COCOeval
    cores = threads or default_threads()
    solo = Runner(images, heads, cores)  # one measurement at a time (ORT: same numbers)
    with timer("reference"):
        solo.reference = solo.reference_of(cal.onnx_model)
        runner = Runner(images, heads, max(1, cores // PARALLEL_VARIANTS), solo.reference)
        if checkpoint is None:
            float_run = solo.measure(cal.onnx_model, with_map=True)
            int8_run = solo.measure(build_qdq(cal, backend=RANK_LAYOUT), with_map=True)
            reference = {"float_map": float_run.map50_95, "float_map50": float_run.map50,
                         "float_map_halves": solo.map_halves(float_run),
                         "int8_map": int8_run.map50_95, "int8_map50": int8_run.map50,
                         "int8_map_halves": solo.map_halves(int8_run),
                         "int8_nsr": solo.nsr(int8_run), "int8_nsr_halves": solo.nsr_halves(int8_run)}
    if checkpoint is None:
        checkpoint = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint,
                      "reference": reference, "layers": _resolve_layers(cfg, cal), "results": {},
                      "calibration": CALIBRATION}
        write_json(save / CHECKPOINT, checkpoint)
    reference, layers = checkpoint["reference"], checkpoint["layers"]
    log.info("float mAP %.4f, all-int8 mAP %.4f on %d images; %d convs to analyse",
             reference["float_map"], reference["int8_map"], len(images), len(layers))
    _check_target(cfg, reference["float_map"], len(images))

    quiet = _QuietQDQ()
    log.addFilter(quiet)
    try:
        return _sweep_and_report(cfg, cal, images, runner, solo, checkpoint, timer,
                                 started, stop_after, progress, threads, cluster)
    finally:
        log.removeFilter(quiet)


def _measure_here(runner, cal, todo, with_map: bool, both: bool):
    """(conv node, its checkpoint entry) for each node of `todo`, measured in this process."""
    from ..deploy_onnx import build_qdq

    all_nodes = [p.node_name for p in cal.conv_params]
    with ThreadPoolExecutor(PARALLEL_VARIANTS, thread_name_prefix="yoloquant-variant") as pool:
        for node in todo:
            t0 = time.perf_counter()
            models = [build_qdq(cal, [n for n in all_nodes if n != node], backend=RANK_LAYOUT)]
            if both:  # proxy_only: the quant-only direction alone
                models.append(build_qdq(cal, [node], backend=RANK_LAYOUT))
            runs = list(pool.map(lambda m: runner.measure(m, with_map), models))
            result = _directions(runner, runs[0], runs[1] if both else None)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            yield node, result


def _sweep_and_report(cfg, cal, images, runner, solo, checkpoint, timer, started,
                      stop_after, progress, threads, cluster=None) -> AnalysisResult:
    from ..progress import Progress

    save = Path(cfg.save_dir)
    reference, layers, results = checkpoint["reference"], checkpoint["layers"], checkpoint["results"]
    with_map = cfg.analysis_metric == "map" and not cfg.analysis_proxy_only
    both = not cfg.analysis_proxy_only  # the float-only direction too
    todo = [n for n in layers if n not in results]
    if stop_after is not None:
        todo = todo[:stop_after]
    names = cal.onnx_to_paddle()
    sweep_start = time.perf_counter()
    # no periodic progress lines: every layer logs its own line with the time left
    if cluster is None:
        measured = _measure_here(runner, cal, todo, with_map, both)
    else:  # Ray tasks, in the order they finish; checkpointed here, on the driver
        from ..distributed.analysis import measure_on_cluster

        log.info("measuring %d convs as tasks on the %s", len(todo), cluster.describe())
        measured = measure_on_cluster(cluster, cal, images, runner.reference,
                                      runner.head_names, todo, with_map, both)
    with Progress(len(layers), "sensitivity", "layers", enabled=progress,
                  initial=len(results), lines=False) as bar:
        for count, (node, result) in enumerate(measured, 1):
            results[node] = result
            write_json(save / CHECKPOINT, checkpoint)  # after every layer: a kill loses one
            bar.update(1)
            done = len(results)
            per = (time.perf_counter() - sweep_start) / count
            r = results[node]
            log.info("[%d/%d] %s (%s): %s; ETA %.0f s", done, len(layers), names.get(node, "?"),
                     _short(node), _layer_line(r, reference), per * (len(layers) - done))
    timer.seconds["sweep"] = round(time.perf_counter() - sweep_start, 2)
    if len(results) < len(layers):
        log.info("stopped after %d of %d layers; run again with --resume to continue",
                 len(results), len(layers))
        return AnalysisResult(save, False, reference=reference, seconds=timer.seconds)

    rows = rank_layers(results, layers, reference, names, cfg.analysis_metric,
                       cfg.analysis_proxy_only)
    rho = correlations(rows)
    with timer("statistics"):
        stats = layer_statistics(cal, layers, images, threads)
    meta = {"model": cfg.model_dir, "model_name": Path(cfg.model_dir).name,
            "eval_images": len(images), "anno_path": str(images.anno_path),
            "proxy_images": images.proxy_count, "noise_images": images.noise_count,
            "metric": cfg.analysis_metric, "proxy_only": cfg.analysis_proxy_only, "algo": cal.algo,
            "calib_images": len(cal.image_ids)}
    if cluster is not None:
        meta["cluster"] = cluster.as_dict()
    result = AnalysisResult(save, True, rows, reference, rho, seconds=timer.seconds)
    with timer("outputs"):
        _write_outputs(cfg, cal, result, stats, meta, None)
    if cfg.get_target_quant_model:
        result.target = find_target_model(cfg, cal, solo, rows, reference, timer)
        _write_outputs(cfg, cal, result, stats, meta, result.target)
    timer.seconds["total"] = round(time.perf_counter() - started, 2)
    _write_outputs(cfg, cal, result, stats, meta, result.target, figures=False)
    return result


def _directions(runner: Runner, only, but) -> dict:
    """One conv's checkpointed result: head noise (all images, and each half) and, where
    measured, mAP both ways. only: the model with only this conv int8; but: every conv int8
    but this one (None with analysis_proxy_only)."""
    r = {"map_quant_only": only.map50_95, "map_quant_only_halves": runner.map_halves(only),
         "nsr_quant_only": runner.nsr(only), "nsr_quant_only_halves": runner.nsr_halves(only),
         "map_float_only": None, "map_float_only_halves": None,
         "nsr_float_only": None, "nsr_float_only_halves": None}
    if but is not None:
        r.update(map_float_only=but.map50_95, map_float_only_halves=runner.map_halves(but),
                 nsr_float_only=runner.nsr(but), nsr_float_only_halves=runner.nsr_halves(but))
    return r


def _layer_line(r: dict, reference: dict) -> str:
    parts = []
    if r["map_quant_only"] is not None:
        parts.append(f"mAP {_pt(r['map_quant_only'] - reference['float_map'])} pt vs float with "
                     f"it alone int8, {_pt(r['map_float_only'] - reference['int8_map'])} pt vs "
                     "all-int8 with it alone float")
    parts.append(f"head SNR {snr_db(r['nsr_quant_only']):.1f} dB with it alone int8")
    if r["nsr_float_only"] is not None:
        removed = 1 - r["nsr_float_only"] / reference["int8_nsr"] if reference["int8_nsr"] else 0
        parts.append(f"{100 * removed:.1f}% of the all-int8 noise gone with it alone float")
    return ", ".join(parts)


def analysis_command(config_path: str, device: str = "cpu", resume: bool = False,
                     ray_address: Optional[str] = None, ray_workers: Optional[int] = None,
                     ray_threads: int = 1) -> AnalysisResult:
    from ..cli import load_job_config
    from ..distributed.cluster import check_flags
    from ..preflight import check_job

    check_flags(ray_address, ray_workers, ray_threads)
    cfg = load_job_config(config_path, device)
    require(cfg, "save_dir")
    check_job(cfg, evaluate=True, save_dir=cfg.save_dir, eval_anno=cfg.fast_val_anno_path,
              eval_max_images=cfg.analysis_max_images)
    cluster = None
    if ray_address is not None:  # a bad address fails before Paddle is even imported
        from ..distributed import connect

        cluster = connect(ray_address, ray_workers, ray_threads)
    root = logging.getLogger()
    level = root.level
    import paddle  # noqa: F401 - importing paddle sets the root logger to WARNING: undo that,
    root.setLevel(level)  # or the per-layer progress lines of a long run are never shown
    try:
        result = run_analysis(cfg, resume=resume, cluster=cluster)
        _print_outputs(cfg, result)
    finally:
        joblog.detach()
        if cluster is not None:
            cluster.close()
    return result


def interrupted_note(config_path: str) -> str:
    """analysis.py's Ctrl-C line: what a rerun can continue from."""
    from ..config import load_config

    save = Path(load_config(config_path).save_dir or "")
    if (save / CHECKPOINT).is_file():
        done = len(json.loads((save / CHECKPOINT).read_text()).get("results", {}))
        return (f"interrupted; {save / CHECKPOINT} keeps the {done} layer(s) finished: run again "
                "with --resume to continue")
    return f"interrupted; nothing to resume in {save} yet"


def _print_outputs(cfg: Config, result: AnalysisResult) -> None:
    save = result.save_dir
    print((save / RANK_TXT).read_text())
    if result.target:
        print((save / SKIP_YAML).read_text())
    print(f"outputs in {save}: {RANK_TXT}, {RANK_CSV}, {RANK_JSON}, {STAT_CSV}, {RANK_PNG}"
          + (f", {HIST_PNG}" if cfg.plot_hist else "")
          + (f", {PROXY_PNG}" if result.spearman.get("proxy_vs_map") is not None else "")
          + (f", {SPLIT_PNG}" if result.spearman.get("split_half") is not None else "")
          + (f", {SKIP_YAML}, {TARGET_DIR}/" if result.target else "") + f", {joblog.RUN_LOG}")

