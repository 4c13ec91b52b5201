"""The `eval.py` command: evaluate an ONNX model or a Paddle model folder on the config's data."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .config import Config, require
from .errors import ConfigError, RuntimeDefectError
from .fileio import write_json
from .runtime import (OPENVINO_PIN, OnnxRuntimeBackend, OpenVinoBackend, PaddleInferenceBackend,
                      PaddleModelFiles, open_backend)
from .validator import (Decoder, EvalResult, compare_to, evaluate, postprocess_settings,
                        preprocess_for, val_dataset)

log = logging.getLogger("yoloquant")
RUNTIMES = ("onnxruntime", "openvino", "paddle", "both")
AUTO, FP32 = "auto", "FP32"  # --reference defaults


def convert_for(cfg: Config, dataset=None):
    """The config's ONNX model converted to Paddle (cached), verified on one real image."""
    from .convert import convert_onnx_to_paddle

    require(cfg, "model_dir")
    verify_image = None
    if dataset is not None and len(dataset):
        verify_image = dataset.load(0).tensor[None]  # a real image, preprocessed as in eval
    return convert_onnx_to_paddle(cfg.model_dir, cache_dir=cfg.cache_dir, verify_image=verify_image,
                                  tolerance=cfg.verify_tolerance)


def evaluate_backend(cfg: Config, backend, max_images: Optional[int] = None, batch_size: int = 1,
                     anno_path: Optional[str] = None, cluster=None) -> EvalResult:
    """`cluster` (a distributed.Cluster): the forward passes on its workers, same numbers."""
    preprocess = preprocess_for(cfg, backend.input_shape)
    dataset = val_dataset(cfg, preprocess, anno_path=anno_path, max_images=max_images)
    decoder = Decoder(cfg.output_layout, preprocess.input_size, postprocess_settings(cfg))
    model = getattr(backend, "path", None) or getattr(getattr(backend, "files", None), "model_file", None)
    desc = f"eval {Path(model).name} ({backend.name})" if model else f"eval {backend.name}"
    if cluster is not None:
        from .distributed.evaluation import evaluate_on_cluster

        return evaluate_on_cluster(cluster, backend, dataset, decoder, batch_size, desc)
    return evaluate(backend, dataset, decoder, batch_size=batch_size, workers=cfg.workers,
                    desc=desc)


def format_table(rows: list[EvalResult]) -> str:
    """The results table; rows compared to a reference (validator.compare_to) get the delta
    in mAP@0.5:0.95 points with its paired bootstrap 95% interval."""
    from .stats import CI_NOTE

    with_delta = [r for r in rows if r.delta is not None]
    delta_head = f" {'dmAP50-95 pts [95% CI]':>24}" if with_delta else ""
    lines = [f"{'model':<40} {'runtime':<28} {'images':>6} {'mAP50-95':>9} {'mAP50':>7} "
             f"{'sec':>7}{delta_head}"]
    for r in rows:
        name = r.model if len(r.model) <= 40 else "..." + r.model[-37:]
        delta = (f" {r.delta.map50_95.points():>24}" if r.delta is not None
                 else f" {'-':>24}" if with_delta else "")
        lines.append(f"{name:<40} {r.runtime:<28} {r.images:>6} {r.map50_95:>9.4f} "
                     f"{r.map50:>7.4f} {r.seconds:>7.1f}{delta}")
    if with_delta:
        ref = with_delta[0].reference
        lines.append(f"dmAP50-95: minus {ref['model']} ({ref['runtime']}), in points; {CI_NOTE}")
    return "\n".join(lines)


def evaluate_command(config_path: str, model: Optional[str] = None, runtime: Optional[str] = None,
                     batch_size: int = 1, json_out: Optional[str] = None, device: str = "cpu",
                     max_images: Optional[int] = None, simulate: bool = False,
                     reference: Optional[str] = AUTO, fidelity_images: Optional[str] = None,
                     fidelity_conf: Optional[float] = None, ray_address: Optional[str] = None,
                     ray_workers: Optional[int] = None, ray_threads: int = 1) -> list[EvalResult]:
    """eval.py. `reference`: a model to compare against (deltas with paired bootstrap
    intervals), FP32 for the config's float model, none, or auto (FP32 for a post_quant.py
    output folder, none otherwise). With `fidelity_images` the models are compared with the
    reference on that image folder instead, without labels (yoloquant.fidelity). With
    `ray_address` the images are sharded over a Ray cluster's workers (yoloquant.distributed)."""
    from .cli import load_job_config
    from .distributed.cluster import check_flags
    from .runtime import require_openvino

    check_flags(ray_address, ray_workers, ray_threads)
    if ray_address is not None and fidelity_images is not None:
        raise ConfigError("--ray_address applies to the labelled evaluation, not --fidelity_images")

    if runtime == "openvino":
        require_openvino()  # before the config's data is prepared (the demo generates its own)
    cfg = load_job_config(config_path, device)
    if model is not None and runtime is not None and not (
            Path(model).suffix == ".onnx" and runtime in ("onnxruntime", "openvino")):
        raise ConfigError("with --model, --runtime can only pick onnxruntime or openvino for an "
                          ".onnx file; otherwise the runtime follows the model (.onnx: ONNX "
                          "Runtime, folder: Paddle, post_quant.py output: every int8 runtime)")
    if simulate and not is_saved_output(model):
        raise ConfigError("--simulate applies to a post_quant.py output folder")
    if fidelity_images is not None:
        return fidelity_command(cfg, model, reference, fidelity_images, fidelity_conf, json_out,
                                max_images, simulate)
    if fidelity_conf is not None:
        raise ConfigError("--fidelity_conf applies with --fidelity_images DIR")
    _check_inputs(cfg, model, max_images)
    ref = open_reference(cfg, model, reference)  # a bad path fails before any evaluation
    cluster = None
    if ray_address is not None:
        from .distributed import connect

        cluster = connect(ray_address, ray_workers, ray_threads)
    try:
        return _evaluate_rows(cfg, model, runtime, batch_size, json_out, max_images, simulate,
                              ref, cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _evaluate_rows(cfg, model, runtime, batch_size, json_out, max_images, simulate, ref,
                   cluster) -> list[EvalResult]:
    results: list[EvalResult] = []
    if model is not None:
        if is_saved_output(model):
            # a post_quant.py output: every int8 artifact in it, on its real int8 runtime
            results.extend(evaluate_saved(cfg, model, max_images, simulate=simulate,
                                          cluster=cluster))
        else:
            backend = OpenVinoBackend(model) if runtime == "openvino" else open_backend(model)
            r = evaluate_backend(cfg, backend, max_images, batch_size, cluster=cluster)
            r.model = str(model)
            results.append(r)
    else:
        results.extend(evaluate_float(cfg, runtime or "onnxruntime", max_images, batch_size,
                                      cluster))
    rows = results
    if ref is not None:
        base = evaluate_backend(cfg, ref[1], max_images, batch_size, cluster=cluster)
        base.model = ref[0]
        compare_to(base, results)
        rows = [base] + results
    print(format_table(rows))
    if cluster is not None:
        print(f"on the {cluster.describe()}")
    if json_out:
        payload = [dict(r.as_dict(), **({"cluster": cluster.as_dict()} if cluster else {}))
                   for r in results]
        write_json(json_out, payload[0] if len(payload) == 1 else payload)
    last = results[-1]
    print(f"mAP@0.5:0.95 = {last.map50_95:.4f}   mAP@0.5 = {last.map50:.4f}   ({last.runtime})")
    return results


def _check_inputs(cfg: Config, model: Optional[str], max_images: Optional[int]) -> None:
    """Before any model runs: the ONNX model is a detector of cfg.arch and the val set loads
    (a Paddle model folder is checked when Paddle loads it)."""
    from .preflight import check_eval_images, check_job, check_model
    from .validator import preprocess_for

    if model is None:
        check_job(cfg, calibrate=False, evaluate=True, eval_max_images=max_images)
    elif Path(model).suffix == ".onnx" or Path(model).is_file():
        facts = check_model(model, cfg.arch, cfg.output_layout)
        shape = tuple(d if d > 0 else None for d in facts.input_shape)
        check_eval_images(cfg, preprocess_for(cfg, shape), max_images=max_images)


def _check_detectors(cfg: Config, *paths: Optional[str]) -> None:
    """Before any model runs (fidelity: no labels to check): every ONNX file named, or the
    config's float model for FP32 / no --model, is a detector of cfg.arch."""
    from .preflight import check_model

    named = [cfg.model_dir if p is None or str(p).upper() == FP32 else p for p in paths
             if p is None or str(p).lower() != "none"]
    for path in dict.fromkeys(named):
        if path is not None and (Path(path).suffix == ".onnx" or Path(path).is_file()):
            check_model(path, cfg.arch, cfg.output_layout)


def evaluate_float(cfg: Config, runtime: str, max_images: Optional[int],
                   batch_size: int, cluster=None) -> list[EvalResult]:
    """The config's float ONNX model on ONNX Runtime (or OpenVINO) and/or its Paddle
    conversion."""
    require(cfg, "model_dir")
    results = []
    if runtime in ("onnxruntime", "both"):
        r = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir), max_images, batch_size,
                             cluster=cluster)
        r.model = cfg.model_dir
        results.append(r)
    if runtime == "openvino":
        r = evaluate_backend(cfg, OpenVinoBackend(cfg.model_dir), max_images, batch_size,
                             cluster=cluster)
        r.model = cfg.model_dir
        results.append(r)
    if runtime in ("paddle", "both"):
        probe = OnnxRuntimeBackend(cfg.model_dir)
        dataset = val_dataset(cfg, preprocess_for(cfg, probe.input_shape), max_images=1)
        converted = convert_for(cfg, dataset)
        backend = PaddleInferenceBackend(PaddleModelFiles(converted.model_file,
                                                          converted.params_file))
        r = evaluate_backend(cfg, backend, max_images, batch_size, cluster=cluster)
        r.model = str(converted.model_dir)
        results.append(r)
    return results


def is_saved_output(model: Optional[str]) -> bool:
    return model is not None and Path(model).is_dir() and (Path(model) / "summary.json").is_file()


def open_reference(cfg: Config, model: Optional[str], reference: Optional[str]):
    """(label, backend) of the reference model, or None. `reference`: a model path, FP32 (the
    config's float ONNX), none, or auto (FP32 when `model` is a post_quant.py output)."""
    if reference == AUTO:
        reference = FP32 if is_saved_output(model) else None
    if reference is None or reference.lower() == "none":
        return None
    if reference.upper() == FP32:
        require(cfg, "model_dir")
        return f"FP32 {Path(cfg.model_dir).name}", OnnxRuntimeBackend(cfg.model_dir)
    return f"reference {reference}", open_backend(reference)


def saved_backends(save_dir: str, simulate: bool = False, openvino: bool = True):
    """(label, backend) of every int8 artifact in a post_quant.py output folder, on its real
    int8 runtime (with `simulate`, also Paddle's float simulation of the int8 program; without
    `openvino`, the QDQ ONNX on ONNX Runtime only)."""
    save = Path(save_dir)
    found = []
    if list(save.glob("*.pdmodel")):
        files = PaddleModelFiles.find(save)
        found.append((f"INT8 {files.model_file.name}", lambda: PaddleInferenceBackend(files, int8=True)))
        if simulate:
            def simulation():
                sim = PaddleInferenceBackend(files, int8=False, mkldnn=False)
                sim.name = "paddle-fp32-simulation-of-int8"
                return sim

            found.append((f"INT8 {files.model_file.name} (SIMULATED)", simulation))
    for onnx_file in sorted(save.glob("*.onnx")):
        found.append((f"INT8 {onnx_file.name}", lambda f=onnx_file: OnnxRuntimeBackend(f)))
        if not openvino:
            continue
        if have_openvino():  # the same file on OpenVINO, which runs QDQ ONNX in int8 too
            found.append((f"INT8 {onnx_file.name}", lambda f=onnx_file: OpenVinoBackend(f)))
        else:
            log.info("OpenVINO is not installed: no OpenVINO row (pip install %s)", OPENVINO_PIN)
    if not found:
        raise ConfigError(f"{save} holds no .pdmodel or .onnx model to evaluate")
    for label, make in found:  # opened one at a time: evaluated, then released
        try:
            backend = make()
        except RuntimeDefectError as exc:
            # a row of garbage mAP is not a result; the other runtimes' rows still are
            log.warning("no %s row: %s", label, exc)
            continue
        yield label, backend


def evaluate_saved(cfg: Config, save_dir: str, max_images: Optional[int] = None,
                   simulate: bool = False, cluster=None, openvino: bool = True) -> list[EvalResult]:
    """Evaluate a post_quant.py output folder in the real int8 runtimes it holds."""
    rows = []
    for label, backend in saved_backends(save_dir, simulate, openvino):
        r = evaluate_backend(cfg, backend, max_images, cluster=cluster)
        r.model = label
        rows.append(r)
    return rows


def fidelity_command(cfg: Config, model: Optional[str], reference: Optional[str], folder: str,
                     conf: Optional[float], json_out: Optional[str], max_images: Optional[int],
                     simulate: bool = False) -> list:
    """eval.py --fidelity_images: every model against the reference on an unlabelled folder."""
    from .fidelity import DEFAULT_CONF, image_folder, measure_fidelity
    from .stats import RESAMPLES

    conf = DEFAULT_CONF if conf is None else conf
    if not 0 < conf <= 1:
        raise ConfigError(f"--fidelity_conf must be in (0, 1], got {conf}")
    reference = FP32 if reference == AUTO else reference
    _check_detectors(cfg, model, reference)
    ref = open_reference(cfg, model, reference)
    if ref is None:
        raise ConfigError("--fidelity_images compares with a reference: give --reference PATH or "
                          "FP32 (the config's float model), not none")
    if is_saved_output(model):
        models = list(saved_backends(model, simulate))
    elif model is not None:
        models = [(str(model), open_backend(model))]
    else:
        require(cfg, "model_dir")
        models = [(cfg.model_dir, OnnxRuntimeBackend(cfg.model_dir))]
    images = image_folder(cfg, folder, ref[1].input_shape, max_images)
    decoder = Decoder(cfg.output_layout, images.preprocess.input_size, postprocess_settings(cfg))
    found = measure_fidelity(ref[1], [b for _, b in models], images, decoder, conf=conf,
                             workers=cfg.workers, names=[label for label, _ in models])
    print(f"fidelity against {ref[0]} on {len(images)} images of {folder} (no labels): the "
          f"reference's {found[0].reference_boxes} detections with score >= {conf} are the ground truth")
    print(f"{'model':<40} {'runtime':<28} {'mAP50-95 vs ref':>24} {'mAP50 vs ref':>8} {'output SNR dB':>22}")
    for (label, backend), f in zip(models, found):
        snr = f"{f.snr_db.value:.1f} [{f.snr_db.lo:.1f}, {f.snr_db.hi:.1f}]"
        name = label if len(label) <= 40 else "..." + label[-37:]
        print(f"{name:<40} {backend.name:<28} {f.map50_95.points(signed=False):>24} "
              f"{100 * f.map50.value:>8.2f} {snr:>22}")
    print("mAP vs ref in points (100: identical detections); SNR of the raw outputs (300: "
          f"identical); 95% CI: bootstrap over images ({RESAMPLES} resamples, basic interval)")
    payload = [{"model": label, "runtime": backend.name, "reference": ref[0], "fidelity": f.as_dict()}
               for (label, backend), f in zip(models, found)]
    if json_out:
        write_json(json_out, payload[0] if len(payload) == 1 else payload)
    return found


def have_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def heldout_config(cfg: Config, calibration_ids, work_dir: str | Path) -> Config:
    """`cfg` evaluating on the train split's annotated images that calibration did not use.

    A second evaluation set for benchmarks: on yolov5n the 109-image val2017_mini alone ranked
    two PTQ variants one way and the 134 held-out train2017_mini images the other way, by
    similar margins (the differences were evaluation noise). Writes the filtered annotation
    file into work_dir."""
    import dataclasses
    import json

    require(cfg, "train_image_dir")
    require(cfg, "train_anno_path")
    anno = json.loads(Path(cfg.data_path(cfg.train_anno_path)).read_text())
    used = set(calibration_ids)
    images = [im for im in anno["images"] if im["id"] not in used]
    if not images:
        raise ConfigError("held-out evaluation: every annotated train image was used for calibration")
    keep = {im["id"] for im in images}
    path = Path(work_dir) / "heldout_instances.json"
    write_json(path, dict(anno, images=images,
                          annotations=[a for a in anno["annotations"] if a["image_id"] in keep]))
    return dataclasses.replace(cfg, val_image_dir=cfg.train_image_dir, val_anno_path=str(path.resolve()),
                               val_max_images=None)
