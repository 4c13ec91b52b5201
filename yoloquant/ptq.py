"""The `post_quant.py` job: ONNX -> Paddle -> calibrate -> INT8 Paddle model + QDQ ONNX.

The deployable ONNX is not a paddle2onnx round trip (measured: it puts Q/DQ on the detection
head and final concat and uses signed int8 activations that ONNX Runtime on x86 leaves in
float). Instead the scales Paddle calibrated are written as Q/DQ pairs into the user's original
ONNX graph, laid out for the config's deploy_backend (written by deploy_onnx.py with yoloquant/qdq:
int8 flows between the convs); the decode subgraph stays float.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from .config import Config, require, to_dict
from .deploy_onnx import build_qdq, ranges_for_judge
from .data import CocoDetection, ImageFolder, iterate_batches
from .errors import ConfigError, DataError, ModelError
from .fileio import staging_dir, write_json
from .provenance import Timer, machine, package_versions
from .runtime import OnnxRuntimeBackend
from .validator import preprocess_for

log = logging.getLogger("yoloquant")

PADDLE_MODEL = "model.pdmodel"
PADDLE_PARAMS = "model.pdiparams"
QDQ_ONNX = "model_int8.onnx"
SUMMARY = "summary.json"


# ---- calibration data ---------------------------------------------------------------------
def calibration_set(cfg: Config, preprocess, count: int):
    """The calibration images: the train split by default (the seed used val: a leak)."""
    if cfg.PTQ.calib_split == "val":
        log.warning("calibrating on the evaluation images (PTQ.calib_split: val): the reported "
                    "mAP is then optimistic")
        image_dir, anno = cfg.val_image_dir, cfg.val_anno_path
    else:
        image_dir, anno = cfg.train_image_dir, cfg.train_anno_path
    if image_dir is None:
        raise ConfigError(f"config: {'val' if cfg.PTQ.calib_split == 'val' else 'train'}_image_dir "
                          "must name the calibration image folder")
    image_dir = cfg.data_path(image_dir)
    if anno is not None:
        dataset = CocoDetection(image_dir, cfg.data_path(anno), preprocess)
    else:
        dataset = ImageFolder(image_dir, preprocess)
    available = len(dataset)
    if available < count:
        log.warning("asked for %d calibration images but %s has %d: using %d", count, image_dir,
                    available, available)
    if isinstance(dataset, CocoDetection):
        return CocoDetection(image_dir, cfg.data_path(anno), preprocess,
                             max_images=min(count, available))
    return ImageFolder(image_dir, preprocess, max_images=min(count, available))


def load_images(dataset, workers: int) -> tuple[list[np.ndarray], list]:
    tensors, names = [], []
    for batch in iterate_batches(dataset, batch_size=1, workers=workers, desc="calibration images"):
        tensors.extend(batch.images)
        names.extend(batch.image_ids if batch.image_ids[0] is not None else batch.file_names)
    if not tensors:
        raise DataError("the calibration set is empty")
    return tensors, names


# ---- Paddle conv <-> ONNX Conv ------------------------------------------------------------
def paddle_params(model_file: Path, params_file: Path, names) -> dict[str, np.ndarray]:
    """Values of the named persistable variables of a Paddle inference model."""
    import paddle

    from .paddle_params import static_mode

    with static_mode():
        scope = paddle.static.Scope()
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(scope):
            paddle.static.load_inference_model(str(model_file)[:-len(".pdmodel")], exe)
            return {n: np.array(scope.find_var(n).get_tensor()) for n in names}


def _weight_key(w: np.ndarray) -> tuple:
    return (w.shape, np.round(w.astype(np.float64).ravel()[:64], 6).tobytes(),
            round(float(np.abs(w).sum()), 3))


def map_convs_to_onnx(model: onnx.ModelProto, paddle_weights: dict[str, np.ndarray]) -> dict[str, str]:
    """Paddle weight name -> ONNX Conv node name, matched by weight content.

    X2Paddle renames everything and may reorder convs, but it copies weights exactly, so a
    weight's values identify its Conv in both graphs.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_key: dict[tuple, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            by_key.setdefault(_weight_key(w), []).append(node.name)
    mapping = {}
    for name, w in paddle_weights.items():
        matches = by_key.get(_weight_key(w), [])
        if len(matches) != 1:
            raise ModelError(f"cannot match Paddle weight {name} {w.shape} to exactly one ONNX Conv "
                             f"(found {len(matches)}); the conversion changed the weights")
        mapping[name] = matches[0]
    return mapping


def upgrade_opset(model: onnx.ModelProto, sample: np.ndarray, input_name: str,
                  target: int = 13) -> onnx.ModelProto:
    """Per-channel Q/DQ need opset 13: convert older graphs (e.g. YOLOX's opset 11), checked.

    The converted graph must give the same output as the original on a real image.
    """
    import onnxruntime as ort
    from onnx import version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises plain RuntimeErrors for unsupported ops
        raise ModelError(f"cannot convert the model from ONNX opset {opset} to {target} (needed for "
                         f"per-channel quantization): {exc}; re-export it with opset {target}") from exc
    outputs = []
    for m in (model, upgraded):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {input_name: sample}))
    for a, b in zip(*outputs):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-5):
            raise ModelError(f"converting the model from opset {opset} to {target} changed its "
                             f"output (max diff {np.abs(a - b).max():.3g}); re-export it with opset {target}")
    log.info("converted the ONNX graph from opset %d to %d for per-channel Q/DQ (outputs unchanged)",
             opset, target)
    return upgraded


def conv_output_ranges(onnx_model: onnx.ModelProto, conv_names: list[str],
                       images: list[np.ndarray], input_name: str) -> dict[str, tuple[float, float]]:
    """(min, max) of each Conv's output over the calibration images (ONNX Runtime, float), 0
    included.

    ONNX Runtime runs a Conv in int8 only when its output is requantized too; Paddle's PTQ
    calibrates Conv inputs, not the X2Paddle conv+bias output, so these ranges are measured here.
    """
    from .runtime import session_with_outputs

    outputs = {node.output[0]: node.name for node in onnx_model.graph.node if node.name in conv_names}
    session = session_with_outputs(onnx_model, list(outputs))
    names = list(outputs)
    lows, highs = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for img in images:
        values = session.run(names, {input_name: img[None]})
        for n, v in zip(names, values):
            lows[n] = min(lows[n], float(v.min()))
            highs[n] = max(highs[n], float(v.max()))
    return {outputs[n]: (lows[n], highs[n]) for n in names}


# ---- the job ------------------------------------------------------------------------------
@dataclass
class PostQuantResult:
    save_dir: Path
    summary: dict
    metrics: list = field(default_factory=list)


def _ptq_settings(cfg: Config, algo: str, skip: Optional[tuple] = None):
    """Paddle's settings; `skip`: the Paddle weight names kept float (resolve_skip_list)."""
    from .calibration import PTQSettings

    p = cfg.PTQ
    return PTQSettings(algo=algo, hist_percent=p.hist_percent, batch_nums=p.batch_nums,
                       batch_size=p.batch_size, quantizable_op_type=tuple(p.quantizable_op_type),
                       weight_quantize_type=p.weight_quantize_type,
                       activation_quantize_type="range_abs_max"
                       if p.activation_quantize_type == "moving_average_abs_max"
                       else p.activation_quantize_type,
                       is_full_quantize=p.is_full_quantize, onnx_format=p.onnx_format,
                       bias_correction=p.bias_correction,
                       skip_tensor_list=tuple(skip) if skip else None)


def check_skip_list(skip: Optional[list], known: list[str]) -> None:
    import difflib

    for name in skip or []:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(known[:3])}"
            raise ConfigError(f"skip_tensor_list names {name!r}, which is not a quantizable conv "
                              f"of this model: give its Paddle weight name or its ONNX Conv node "
                              f"name ({hint})")


def resolve_skip_list(skip: Optional[list], paddle_to_onnx: dict) -> dict:
    """{Paddle weight name: ONNX Conv node name} of every conv skip_tensor_list names, in its
    order. Logs, summary.json and analysis_layers name convs both ways, so both are accepted
    (and an ONNX name without its '/Conv' tail, as analysis.txt prints it)."""
    to_paddle = {onnx_name: w for w, onnx_name in paddle_to_onnx.items()}
    short = {n[:-len("/Conv")]: w for n, w in to_paddle.items() if n.endswith("/Conv")}
    check_skip_list([n for n in skip or [] if n not in short],
                    list(paddle_to_onnx) + list(to_paddle))
    resolved = {}
    for name in skip or []:
        weight = name if name in paddle_to_onnx else to_paddle.get(name) or short[name]
        resolved[weight] = paddle_to_onnx[weight]
    return resolved


@dataclass
class Calibration:
    """Everything one calibration run learned, reusable for any subset of quantized convs."""

    @property
    def input_name(self) -> str:
        """The ONNX graph's image input (also when rebuilt from a file, without `converted`)."""
        if self.converted is not None:
            return self.converted.onnx_input_name
        consts = {i.name for i in self.onnx_model.graph.initializer}
        return next(i.name for i in self.onnx_model.graph.input if i.name not in consts)

    def measure_tensor_ranges(self) -> dict:
        """The glue grids (build_qdq measures them on first use; needs the images)."""
        from .qdq import tensor_ranges

        if not self.tensor_ranges:
            if not self.images:
                raise ConfigError("the calibration has neither its images nor its tensor ranges "
                                  "(saved by an older version): run again without --resume")
            with self.timer("glue_ranges"):
                self.tensor_ranges.update(tensor_ranges(self.onnx_model, self.images, self.input_name))
        return self.tensor_ranges

    cfg: Config
    algo: str
    converted: object  # convert.ConvertedModel
    ptq: object  # calibration.PTQResult (its Paddle model lives in the run's work folder)
    onnx_model: onnx.ModelProto
    conv_params: list  # qdq.ConvQuantParams, one per quantized ONNX Conv, in Paddle order
    paddle_to_onnx: dict  # Paddle weight name -> ONNX Conv node name
    images: list
    image_ids: list
    image_dir: str
    timer: Timer
    # ONNX Conv name -> why it stays float (precision.choose_float_convs), and the 8-bit SNR
    # measured for each conv (precision.LayerSNR)
    float_reasons: dict = field(default_factory=dict)
    layer_snr: dict = field(default_factory=dict)
    # the convs skip_tensor_list keeps float: Paddle weight name -> ONNX Conv node name
    user_skip: dict = field(default_factory=dict)
    # convs under the SNR threshold that run int8 because of max_float_conv_fraction -> why
    over_budget: dict = field(default_factory=dict)
    # (min, max) of the float graph's tensors on the calibration images (the grids of the glue
    # between convs; measured on first use by build_qdq) and what the last placement did
    tensor_ranges: dict = field(default_factory=dict)
    placement: Optional[dict] = None
    # what cross-layer equalization did to the float model (equalize.EqualizationResult)
    equalization: Optional[object] = None

    def onnx_to_paddle(self) -> dict:
        return {v: k for k, v in self.paddle_to_onnx.items()}


def calibrate(cfg: Config, work_dir: str | Path, algo: Optional[str] = None,
              timer: Optional[Timer] = None) -> Calibration:
    """Convert, calibrate with Paddle's (fixed) PTQ into work_dir, and map scales to ONNX Convs."""
    from .calibration import calibration_loader, run_ptq
    from .convert import convert_onnx_to_paddle
    from .equalize.job import equalize_float_model
    from .onnx_normalize import conv_constants_to_initializers
    from .precision import SNR_IMAGES, apply_float_budget, choose_float_convs, output_grid
    from .qdq import ConvQuantParams

    require(cfg, "model_dir")
    algo = algo or cfg.PTQ.algo
    timer = timer or Timer()
    probe = OnnxRuntimeBackend(cfg.model_dir)
    preprocess = preprocess_for(cfg, probe.input_shape)
    calib = calibration_set(cfg, preprocess, cfg.PTQ.batch_nums * cfg.PTQ.batch_size)
    with timer("load_calibration_images"):
        images, image_ids = load_images(calib, cfg.workers)
    log.info("calibrating on %d images from %s", len(images), calib.image_dir)
    with timer("equalize"):
        onnx_model = onnx.load(cfg.model_dir)
        conv_constants_to_initializers(onnx_model)
        onnx_model = upgrade_opset(onnx_model, images[0][None], probe.input_name)
        equalized = equalize_float_model(cfg, onnx_model, images, probe.input_name)
        onnx_model = equalized.model
    with tempfile.TemporaryDirectory(prefix="yoloquant-eq-") as tmp, timer("convert"):
        # the equalized float model is what gets converted, so the Paddle int8 model carries
        # the same weights as the QDQ ONNX written from onnx_model
        source = cfg.model_dir
        if equalized.applied:
            source = str(Path(tmp) / Path(cfg.model_dir).name)
            onnx.save(onnx_model, source)
        # verify the conversion on a real, correctly preprocessed calibration image
        converted = convert_onnx_to_paddle(source, cache_dir=cfg.cache_dir,
                                           verify_image=images[0][None],
                                           tolerance=cfg.verify_tolerance)
    conv_weights = _conv_weight_names(converted.model_file)
    with timer("onnx_map"):
        all_to_onnx = map_convs_to_onnx(onnx_model, paddle_params(
            converted.model_file, converted.params_file, conv_weights))
    user_skip = resolve_skip_list(cfg.skip_tensor_list, all_to_onnx)
    float_reasons, layer_snr, over_budget = {}, {}, {}
    ranges = ranges_for_judge(cfg, onnx_model, images, probe.input_name, timer)
    input_lows = {t: lo for t, (lo, _) in ranges.items()} if ranges else None

    def decide(thresholds: dict, ops):
        """Called by the PTQ once thresholds are known: measure every conv's 8-bit SNR with
        them, name the weights of the convs that must stay float (in both runtimes) and, with
        conv_bias_correction, the bias shift of every other conv.

        The algorithm's own thresholds are used, as deployed, so a conv whose input an
        algorithm clips hard counts too. Measured with each input's abs-max instead (without
        bias correction), avg kept 9 convs float of 60 on yolov5n and improved (ONNX 0.3034),
        but hist fell to 0.2809, more than 2 points under float."""
        from .calibration import LayerDecisions

        with timer("layer_snr"):
            candidates = [ConvQuantParams(
                node_name=all_to_onnx[op.weights[0]],
                input_threshold=max(float(thresholds[op.inputs[0]]), 1e-8),
                weight_thresholds=np.asarray(thresholds[op.weights[0]], dtype=np.float64))
                for op in ops if op.op_type in ("conv2d", "depthwise_conv2d") and op.inputs
                and op.weights and op.weights[0] in all_to_onnx
                and op.inputs[0] in thresholds and op.weights[0] in thresholds]
            reasons, snr = choose_float_convs(onnx_model, candidates, images[:SNR_IMAGES],
                                              converted.onnx_input_name, cfg.min_layer_snr_db,
                                              cfg.keep_regression_float, cfg.conv_bias_correction,
                                              input_lows)
        if cfg.max_float_conv_fraction is not None:
            total = sum(n.op_type == "Conv" for n in onnx_model.graph.node)
            reasons, over = apply_float_budget(
                reasons, snr, int(cfg.max_float_conv_fraction * total))
            over_budget.update(over)
        float_reasons.update(reasons)
        layer_snr.update(snr)
        to_paddle = {v: k for k, v in all_to_onnx.items()}
        shifts = {to_paddle[name]: s.bias_shift for name, s in snr.items()
                  if cfg.conv_bias_correction and name not in reasons}
        return LayerDecisions(tuple(to_paddle[name] for name in reasons), shifts)

    with timer("ptq"):
        loader = calibration_loader(images, converted.paddle_input_name, cfg.PTQ.batch_size)
        result = run_ptq(_ptq_settings(cfg, algo, tuple(user_skip)), loader, str(converted.model_dir),
                         converted.model_file.name, converted.params_file.name, str(work_dir),
                         save_model_filename=PADDLE_MODEL, before_update=decide)
    with timer("onnx_scales"):
        # a conv skipped via skip_tensor_list (or keep_float) still reads its (float) weight, so
        # it is listed with weights but no quantized input: it has no scales and stays float
        conv_ops = [op for op in result.quantized_ops
                    if op.op_type in ("conv2d", "depthwise_conv2d") and op.weights and op.inputs]
        to_onnx = {op.weights[0]: all_to_onnx[op.weights[0]] for op in conv_ops}
        out_ranges = conv_output_ranges(onnx_model, list(to_onnx.values()), images,
                                        converted.onnx_input_name)
        # the same bias shifts the Paddle model got (only those it could apply)
        shifts = {all_to_onnx[w]: layer_snr[all_to_onnx[w]].bias_shift for w in result.bias_corrected}
        params = [ConvQuantParams(
            node_name=to_onnx[op.weights[0]],
            input_threshold=float(result.thresholds[op.inputs[0]]),
            weight_thresholds=np.asarray(result.thresholds[op.weights[0]], dtype=np.float64),
            bias_shift=shifts.get(to_onnx[op.weights[0]]),
            **output_grid(onnx_model, to_onnx[op.weights[0]], *out_ranges[to_onnx[op.weights[0]]]))
            for op in conv_ops]
    if cfg.weight_rounding == "gptq" and params:
        params = round_weights_gptq(onnx_model, params, images, converted.onnx_input_name,
                                    Path(work_dir) / PADDLE_MODEL,
                                    {v: k for k, v in to_onnx.items()}, timer)
    return Calibration(cfg, algo, converted, result, onnx_model, params, to_onnx, images,
                       image_ids, str(calib.image_dir), timer, float_reasons, layer_snr, user_skip,
                       over_budget=over_budget, tensor_ranges=ranges, equalization=equalized)


def round_weights_gptq(onnx_model: onnx.ModelProto, params: list, images: list, input_name: str,
                       paddle_model: Path, to_paddle: dict, timer: Timer) -> list:
    """GPTQ int8 weights for every conv in params, written into the saved Paddle int8 model and
    returned as the params' quantized_weight (the QDQ ONNX takes them from there)."""
    from dataclasses import replace

    from .gptq import gptq_weights
    from .paddle_params import write_paddle_weights

    with timer("gptq"):
        ints = gptq_weights(onnx_model, params, images, input_name)
        write_paddle_weights(paddle_model, {to_paddle[name]: q for name, q in ints.items()})
    log.info("GPTQ rounded the weights of %d convs on %d images", len(ints), len(images))
    return [replace(p, quantized_weight=ints[p.node_name]) for p in params]


def run_summary(cal: Calibration, activation_type: str, started: str, command: str,
                float_nodes=()) -> dict:
    from .equalize.job import float_conv_explanations, original_sha

    cfg, converted = cal.cfg, cal.converted
    quantized = sorted(p.node_name for p in cal.conv_params if p.node_name not in set(float_nodes))
    kept = [n for n in cal.onnx_model.graph.node if n.name not in set(quantized)]
    return {
        "command": command,
        "started": started,
        "config": to_dict(cfg),
        # sha256: the user's model; with equalization the converted (equalized) one differs
        "model": {"path": cfg.model_dir, "sha256": original_sha(cal),
                  "equalized_sha256": converted.sha256 if original_sha(cal) != converted.sha256 else None,
                  "input": converted.onnx_input_name, "input_shape": list(converted.input_shape),
                  "paddle_conversion_max_abs_diff": converted.max_abs_diff,
                  "onnx_rewrites": converted.normalize_counts},
        "algorithm": cal.algo,
        "activation_type": activation_type,
        "calibration": {"images": len(cal.images), "split": cfg.PTQ.calib_split,
                        "image_dir": cal.image_dir, "image_ids": cal.image_ids},
        "quantized": {"onnx_conv_nodes": quantized,
                      "paddle_weights": sorted(w for w, n in cal.paddle_to_onnx.items()
                                               if n in set(quantized)),
                      # skip_tensor_list as given, and each conv it names in both forms
                      "skipped_by_user": {"as_given": list(cfg.skip_tensor_list or []),
                                          "paddle_weights": list(cal.user_skip),
                                          "onnx_conv_nodes": list(cal.user_skip.values())}},
        "kept_float": {"onnx_nodes": len(kept),
                       "conv_nodes": sorted(n.name for n in kept if n.op_type == "Conv"),
                       "conv_reasons": dict(sorted(cal.float_reasons.items())),
                       "int8_over_budget": dict(sorted(cal.over_budget.items())),
                       "why_equalization_did_not_save": float_conv_explanations(
                           cal, [n.name for n in kept if n.op_type == "Conv"]),
                       "op_types": sorted({n.op_type for n in kept})},
        # judged after equalization: the SNRs are those of the equalized model
        "layer_snr_db": {k: round(v.snr_db, 2) for k, v in cal.layer_snr.items()},
        "equalization": cal.equalization.as_dict() if cal.equalization is not None else None,
        "deploy_backend": cfg.deploy_backend,
        # where int8 flows (yoloquant/qdq/placement.py); unknown_ops: nodes left float because
        # the placement does not know their op type
        "qdq_placement": cal.placement,
        "outputs": {"paddle_model": PADDLE_MODEL, "paddle_params": PADDLE_PARAMS,
                    "qdq_onnx": QDQ_ONNX},
        "versions": package_versions(),
        "machine": machine(),
        "seconds": cal.timer.seconds,
    }


def check_artifacts(out_dir: Path, cal: Calibration) -> dict:
    """Load every saved INT8 artifact in its runtime and run it once on a calibration image,
    before the run reports success: a saved model that cannot run is a failed run (the
    YOLOv6-Lite Paddle program once saved fine and then did not load). Returns what ran."""
    from .runtime import PaddleInferenceBackend, PaddleModelFiles

    image = cal.images[0][None]
    expected = None
    checked = {}
    for name, open_artifact in (
            (PADDLE_MODEL, lambda: PaddleInferenceBackend(PaddleModelFiles(
                out_dir / PADDLE_MODEL, out_dir / PADDLE_PARAMS), int8=True)),
            (QDQ_ONNX, lambda: OnnxRuntimeBackend(out_dir / QDQ_ONNX))):
        try:
            output = np.asarray(open_artifact()(image))
        except ModelError as exc:
            raise ModelError(f"the saved INT8 model {name} does not run, so nothing was saved: "
                             f"{exc}") from exc
        if not np.all(np.isfinite(output)) or (expected and output.shape != expected):
            raise ModelError(f"the saved INT8 model {name} gives a non-finite or misshapen output "
                             f"{list(output.shape)} on a calibration image, so nothing was saved")
        expected = output.shape
        checked[name] = list(output.shape)
    return checked


def quantize(cfg: Config, save_dir: str | Path, algo: Optional[str] = None,
             activation_type: str = "uint8") -> PostQuantResult:
    """Run the whole PTQ job and write its outputs atomically into save_dir."""
    with staging_dir(save_dir) as stage:
        result = quantize_into(cfg, stage, algo, activation_type)
    result.save_dir = Path(save_dir)
    log.info("saved the INT8 Paddle model, %s and %s in %s", QDQ_ONNX, SUMMARY, save_dir)
    return result


def quantize_into(cfg: Config, out_dir: Path, algo: Optional[str] = None,
                  activation_type: str = "uint8") -> PostQuantResult:
    """The PTQ job's outputs written into out_dir (a staging folder: see quantize)."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out_dir = Path(out_dir)
    cal = calibrate(cfg, out_dir, algo)
    skipped = {cal.paddle_to_onnx[w] for w in cal.user_skip if w in cal.paddle_to_onnx}
    with cal.timer("onnx_export"):
        onnx.save(build_qdq(cal, skipped, activation_type), str(out_dir / QDQ_ONNX))
    summary = run_summary(cal, activation_type, started, "post_quant", float_nodes=skipped)
    with cal.timer("check_artifacts"):
        summary["artifacts_ran"] = check_artifacts(out_dir, cal)
    write_json(out_dir / SUMMARY, summary)
    return PostQuantResult(out_dir, summary)


def _conv_weight_names(model_file: Path) -> list[str]:
    """Filter names of the conv ops, read from the program's protobuf (no static-mode needed)."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(Path(model_file).read_bytes())
    names = []
    for op in desc.blocks[0].ops:
        if op.type in ("conv2d", "depthwise_conv2d"):
            names += [a for var in op.inputs if var.parameter == "Filter" for a in var.arguments]
    return names


def evaluate_fp32_and_saved(cfg: Config, save_dir: str, result, max_images: Optional[int]) -> list:
    """FP32 vs every int8 artifact in save_dir; metrics are added to its summary.json."""
    from .evaluate import evaluate_backend, evaluate_saved, format_table
    from .joblog import note
    from .validator import compare_to

    fp32 = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir), max_images)
    fp32.model = "FP32 " + Path(cfg.model_dir).name
    rows = [fp32] + evaluate_saved(cfg, save_dir, max_images)
    compare_to(fp32, rows[1:])  # delta and delta_ci95 of every INT8 row, in summary.json too
    result.metrics = rows
    result.summary["metrics"] = [r.as_dict() for r in rows]
    write_json(Path(save_dir) / SUMMARY, result.summary)
    table = format_table(rows)
    print(table)
    note(table)
    return rows


def post_quant_command(config_path: str, save_dir: str, algo: Optional[str] = None,
                       device: str = "cpu", evaluate: bool = False,
                       max_images: Optional[int] = None) -> PostQuantResult:
    """The post_quant.py job: inputs checked first; save_dir appears only with every output
    (and, with evaluate, the metrics) complete."""
    from .cli import load_job_config
    from .joblog import staged_run
    from .preflight import check_job

    cfg = load_job_config(config_path, device, algo)
    check_job(cfg, evaluate=evaluate, save_dir=save_dir, eval_max_images=max_images)
    with staged_run(save_dir) as stage:
        result = quantize_into(cfg, stage)
        if evaluate:
            report_metrics(cfg, stage, result, max_images)
    result.save_dir = Path(save_dir)
    return result


def report_metrics(cfg: Config, out_dir: Path, result, max_images: Optional[int]) -> list:
    """--eval: FP32 vs each INT8 artifact in out_dir, printed (and in run.log), into summary.json."""
    from .joblog import note

    rows = evaluate_fp32_and_saved(cfg, str(out_dir), result, max_images)
    fp32 = rows[0]
    lines = [f"INT8 {r.runtime}: mAP@0.5:0.95 {r.map50_95:.4f} ({r.delta.map50_95.points()} "
             f"points vs FP32 {fp32.map50_95:.4f}, 95% CI)" for r in rows[1:]]
    ptq_s = result.summary["seconds"].get("ptq", 0.0)
    lines.append(f"PTQ ({result.summary['algorithm']}, {result.summary['calibration']['images']} "
                 f"images): {ptq_s:.1f} s")
    print("\n".join(lines))
    note("\n".join(lines))
    return rows
