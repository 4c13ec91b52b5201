"""Whether learned rounding is deployed: judged on calibration images reconstruction did not see.

Learned rounding lowers each layer's reconstruction loss on the images it is learned on; that
does not guarantee the whole model is closer to float elsewhere (on yolov5n with the default
settings AdaRound measured +0.9 points on val2017_mini and -0.75 on another COCO val subset). So
fine_tune.py keeps the last `recon_guard_images` calibration images out of reconstruction and
compares, on them, the deployed QDQ model with the learned int8 weights against the same model
with round-to-nearest weights, both against the float model and without labels
(yoloquant.fidelity): the output SNR (the most reproducible label-free measure on yolov5n,
bench/results/fidelity_yolov5n_coco_mini.md) decides, and the detection fidelity (mAP of each
against the float model's detections) is reported beside it. The learned rounding is deployed
unless it is further from float than round-to-nearest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from .errors import ConfigError

log = logging.getLogger("yoloquant")


@dataclass
class GuardVerdict:
    deploy_learned: bool
    images: int
    rtn: dict  # fidelity.Fidelity.as_dict() of round-to-nearest against float
    learned: dict  # the same for the learned rounding
    delta_snr_db: list  # learned minus rtn: [value, lo, hi] (paired bootstrap 95% interval)
    delta_map50_95: list  # the same for the detection fidelity

    def as_dict(self) -> dict:
        return {"deploy_learned": self.deploy_learned, "images": self.images,
                "rule": "deploy the learned rounding unless its output SNR against float on "
                        "these calibration images (not used to learn it) is lower than "
                        "round-to-nearest's",
                "round_to_nearest": self.rtn, "learned": self.learned,
                "learned_minus_rtn_snr_db": self.delta_snr_db,
                "learned_minus_rtn_fidelity_map50_95": self.delta_map50_95}


def split_guard_images(images: Sequence[np.ndarray], guard: int) -> tuple[list, list]:
    """(images to reconstruct on, guard images): the last `guard` calibration images are held
    out (0: none, no guard). With fewer than 2 x guard calibration images a quarter of them is
    held out instead, so that most still go to reconstruction."""
    images = list(images)
    if guard < 0:
        raise ConfigError(f"config: recon_guard_images must be >= 0, got {guard}")
    if guard and len(images) < 2 * guard:
        log.info("recon_guard_images is %d but calibration has %d images: holding out %d",
                 guard, len(images), len(images) // 4)
        guard = len(images) // 4
    return (images[:-guard], images[-guard:]) if guard else (images, [])


def judge(float_model: onnx.ModelProto, rtn_model: onnx.ModelProto,
          learned_model: onnx.ModelProto, images: Sequence[np.ndarray], decoder) -> GuardVerdict:
    """Round-to-nearest and learned rounding, each against the float model on the guard images."""
    from .fidelity import measure_fidelity, paired_fidelity_delta
    from .runtime import OnnxRuntimeBackend

    backends = [OnnxRuntimeBackend.from_model(m, name=n) for m, n in (
        (float_model, "float"), (rtn_model, "round-to-nearest"), (learned_model, "learned"))]
    rtn, learned = measure_fidelity(backends[0], backends[1:], list(images), decoder,
                                    names=["round-to-nearest", "learned"])
    delta = paired_fidelity_delta(rtn, learned)
    triple = lambda i: [round(float(v), 4) for v in (i.value, i.lo, i.hi)]  # noqa: E731
    verdict = GuardVerdict(learned.snr_db.value >= rtn.snr_db.value, len(images), rtn.as_dict(),
                           learned.as_dict(), triple(delta["snr_db"]), triple(delta["map50_95"]))
    log.info("reconstruction guard on %d held-out calibration images: output SNR against float "
             "%.2f dB round-to-nearest, %.2f dB learned (%+.2f dB [%+.2f, %+.2f]); %s",
             len(images), rtn.snr_db.value, learned.snr_db.value, *verdict.delta_snr_db,
             "the learned rounding is deployed" if verdict.deploy_learned else
             "the learned rounding is further from float: round-to-nearest is deployed")
    return verdict
