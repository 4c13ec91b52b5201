"""The `fine_tune.py` job: PTQ calibration, then learned weight rounding, saved like post_quant.

Activation scales come from calibration (`--algo`) and the weights' rounding is learned
(yoloquant.reconstruct); with `recon_act_scale: learned` the conv inputs' thresholds are learned
too. Outputs: the QDQ ONNX with the learned int8 weights (and thresholds), the Paddle int8
program with the same written in, summary.json with per-layer/region losses.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import onnx

from .config import Config
from .errors import ConfigError
from .fileio import staging_dir, write_json
from .deploy_onnx import build_qdq
from .ptq import (PADDLE_MODEL, QDQ_ONNX, SUMMARY, PostQuantResult, calibrate, check_artifacts,
                  run_summary)
from .recon_guard import judge, split_guard_images
from .reconstruct import ReconSettings

log = logging.getLogger("yoloquant")


def settings_from(cfg: Config, recon_level: str, simulate_activation_quant: bool, epochs: int,
                  lr: float, limit: int) -> ReconSettings:
    if cfg.region_weights_names:
        log.warning("region_weights_names is ignored: each region's convs are read from the graph")
    if cfg.regions and recon_level != "region-wise":
        raise ConfigError("config: regions are used by --recon_level region-wise only")
    return ReconSettings(recon_level=recon_level, simulate_activation_quant=simulate_activation_quant,
                         epochs=epochs, lr=lr, limit=limit, drop_prob=cfg.drop_prob,
                         images=cfg.recon_images, lam=cfg.recon_lambda, beta=tuple(cfg.recon_beta),
                         warmup=cfg.recon_warmup, input_source=cfg.recon_input, regions=cfg.regions,
                         act_scale=cfg.recon_act_scale)


def recon_cache_dir(cfg: Config) -> Path:
    from .convert import default_cache_dir

    base = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return base.parent / "recon"


def fine_tune(cfg: Config, save_dir: str | Path, settings: ReconSettings, algo: Optional[str] = None,
              activation_type: str = "uint8", progress: bool = True) -> PostQuantResult:
    """Calibrate, learn the rounding, write the int8 models and summary atomically into save_dir."""
    with staging_dir(save_dir) as stage:
        result = fine_tune_into(cfg, stage, settings, algo, activation_type, progress)
    result.save_dir = Path(save_dir)
    log.info("saved in %s", save_dir)
    return result


def fine_tune_into(cfg: Config, out_dir: Path, settings: ReconSettings, algo: Optional[str] = None,
                   activation_type: str = "uint8", progress: bool = True) -> PostQuantResult:
    """fine_tune's outputs written into out_dir (a staging folder: see fine_tune)."""
    from .paddle_params import write_paddle_int8_params
    from .reconstruct import reconstruct, with_learned

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out_dir = Path(out_dir)
    # The learned rounding replaces GPTQ's, so calibrate with round-to-nearest weights.
    # Bias correction is measured after the rounding is learned (below): shifts measured
    # for round-to-nearest weights would not fit the learned ones.
    cal = calibrate(dataclasses.replace(cfg, conv_bias_correction=False,
                                        weight_rounding="nearest"), out_dir, algo)
    skipped = {cal.paddle_to_onnx[w] for w in cal.user_skip if w in cal.paddle_to_onnx}
    recon_images, guard_images = split_guard_images(cal.images, cfg.recon_guard_images)

    def quantized_so_far(ints: dict, thresholds: Optional[dict] = None) -> onnx.ModelProto:
        """The deployed QDQ model with the rounding (and input thresholds) learned so far."""
        params = [with_learned(p, ints, thresholds or {}) for p in cal.conv_params]
        return build_qdq(dataclasses.replace(cal, conv_params=params), skipped, activation_type)

    with cal.timer("reconstruction"):
        result = reconstruct(cal.onnx_model, cal.conv_params, recon_images,
                             cal.converted.onnx_input_name, settings, float_nodes=skipped,
                             quantized_so_far=quantized_so_far, cache_dir=recon_cache_dir(cfg),
                             progress=progress)
    verdict = None
    if guard_images:
        with cal.timer("guard"):
            verdict = judge(cal.onnx_model, quantized_so_far({}),
                            quantized_so_far(result.ints, result.thresholds), guard_images, _decoder(cfg, cal))
    deploy = verdict is None or verdict.deploy_learned
    ints = result.ints if deploy else {}
    thresholds = result.thresholds if deploy else {}
    if deploy:
        cal.conv_params = result.conv_params
    shifts = {}
    if cfg.conv_bias_correction:
        with cal.timer("bias_correction"):
            shifts = correct_biases_after_reconstruction(cal, skipped)
    with cal.timer("onnx_export"):
        onnx.save(build_qdq(cal, skipped, activation_type), str(out_dir / QDQ_ONNX))
    with cal.timer("paddle_export"):
        to_paddle = cal.onnx_to_paddle()
        written, scales_written = write_paddle_int8_params(
            out_dir / PADDLE_MODEL, weights={to_paddle[name]: q for name, q in ints.items()},
            act_thresholds={to_paddle[name]: t for name, t in thresholds.items()}, bias_deltas=shifts)
    summary = run_summary(cal, activation_type, started, "fine_tune", float_nodes=skipped)
    summary["reconstruction"] = result.summary(settings)
    summary["reconstruction"]["paddle_weights_written"] = written
    summary["reconstruction"]["paddle_act_thresholds_written"] = scales_written
    summary["reconstruction"]["input_thresholds"] = {  # conv: [calibrated, learned]
        c: [round(v, 6) for v in pair] for u in result.units for c, pair in u.input_thresholds.items()}
    summary["reconstruction"]["bias_corrected_convs"] = len(shifts)
    summary["reconstruction"]["paddle_to_onnx"] = dict(cal.paddle_to_onnx)
    summary["reconstruction"]["images"] = min(len(recon_images), settings.images or len(recon_images))
    summary["reconstruction"]["guard"] = verdict.as_dict() if verdict else None
    summary["reconstruction"]["deployed"] = "learned" if ints else "round-to-nearest"
    with cal.timer("check_artifacts"):
        summary["artifacts_ran"] = check_artifacts(out_dir, cal)
    write_json(out_dir / SUMMARY, summary)
    rs = summary["reconstruction"]
    log.info("%s: %d units, loss %.4g -> %.4g (sum over units), %.1f%% of weights rounded the other "
             "way, %.0f s", settings.recon_level, rs["units"], rs["loss_before_total"],
             rs["loss_after_total"], 100 * rs["changed_fraction"], cal.timer.seconds.get("reconstruction", 0))
    return PostQuantResult(out_dir, summary)


def _decoder(cfg: Config, cal):
    from .validator import Decoder, postprocess_settings, preprocess_for

    preprocess = preprocess_for(cfg, cal.converted.input_shape)
    return Decoder(cfg.output_layout, preprocess.input_size, postprocess_settings(cfg))


def correct_biases_after_reconstruction(cal, float_nodes) -> dict:
    """Bias correction (precision.layer_snr) measured with the learned int8 weights: sets
    each int8 conv's ConvQuantParams.bias_shift and returns {Paddle bias parameter: shift}
    for the same convs in the Paddle model. Convs without a bias parameter in the Paddle
    program are left uncorrected in both."""
    from .paddle_params import conv_bias_params
    from .precision import SNR_IMAGES, layer_snr

    params = [p for p in cal.conv_params if p.node_name not in set(float_nodes)]
    to_paddle = cal.onnx_to_paddle()
    biases = conv_bias_params(cal.converted.model_file, [to_paddle[p.node_name] for p in params])
    params = [p for p in params if to_paddle[p.node_name] in biases]
    snr = layer_snr(cal.onnx_model, params, cal.images[:SNR_IMAGES], cal.converted.onnx_input_name,
                    correct_bias=True)
    cal.conv_params = [dataclasses.replace(p, bias_shift=snr[p.node_name].bias_shift)
                       if p.node_name in snr else p for p in cal.conv_params]
    log.warning("bias correction after reconstruction: %d convs; on the YOLOv6-Lite hard case it measured "
                "worse than the rounding alone on held-out images (README, Results)", len(snr))
    return {biases[to_paddle[name]]: s.bias_shift for name, s in snr.items()}


def fine_tune_command(config_path: str, save_dir: str, algo: Optional[str] = None, device: str = "cpu",
                      recon_level: str = "layer-wise", simulate_activation_quant: bool = False,
                      epochs: int = 25, lr: float = 0.01, limit: int = 6, evaluate: bool = False,
                      max_images: Optional[int] = None) -> PostQuantResult:
    """The fine_tune.py job: inputs checked before Paddle is imported; save_dir appears only
    with every output (and, with evaluate, the metrics) complete."""
    from .cli import load_job_config
    from .joblog import note, staged_run
    from .preflight import check_job

    cfg = load_job_config(config_path, device, algo)
    settings = settings_from(cfg, recon_level, simulate_activation_quant, epochs, lr, limit)
    check_job(cfg, evaluate=evaluate, save_dir=save_dir, eval_max_images=max_images)
    with staged_run(save_dir) as stage:
        result = fine_tune_into(cfg, stage, settings)
        if evaluate:
            from .ptq import evaluate_fp32_and_saved

            evaluate_fp32_and_saved(cfg, str(stage), result, max_images)
        rs = result.summary["reconstruction"]
        line = (f"{recon_level} ({'QDrop p=%g' % settings.drop_prob if simulate_activation_quant else 'weights only'}): "
                f"{rs['units']} {'regions' if recon_level == 'region-wise' else 'layers'} "
                f"({rs['convs_learned']} convs), reconstruction loss {rs['loss_before_total']:.4g} -> "
                f"{rs['loss_after_total']:.4g}, {100 * rs['changed_fraction']:.1f}% of weights re-rounded, "
                f"{result.summary['seconds'].get('reconstruction', 0):.0f} s")
        print(line)
        note(line)
    result.save_dir = Path(save_dir)
    return result


