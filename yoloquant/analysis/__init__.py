"""The `analysis.py` job: which convs quantization hurts, and the smallest float fallback that
meets a target mAP.

PaddleSlim's analysis re-runs the whole PTQ and a Paddle evaluation for every layer (about a
minute per layer for yolov5n on 2 cores) and fails with onnx_format. Here Paddle calibrates
once (`ptq.calibrate`); every variant is the original ONNX graph with Q/DQ on a chosen subset
of convs (`deploy_onnx.build_qdq`), run by ONNX Runtime on evaluation images decoded once and kept in
memory. A variant then costs a few seconds.

Each analysed conv is measured in both directions:

* quant-only: only this conv quantized, the rest float; its mAP drop against float;
* float-only: every conv quantized except this one; the mAP it recovers against full int8.

Their sum (in mAP) is the conv's sensitivity, the ranking key. The same forward passes give a
cheap proxy: the noise the conv adds alone to the detection head's raw outputs (against float,
on the first few images). The Spearman correlation between the proxy and the mAP ranking says
whether the proxy alone (`analysis_proxy_only`: one variant per conv on those few images) can
be trusted for a model; the correlation between the two mAP directions says whether the mAP
differences themselves rise above the noise of the evaluation set.

Every finished layer is checkpointed (JSON, atomic) together with the calibration's scales, so
`--resume` continues after a kill with the same scales and the same results.
"""
from ..stats import snr_db
from .checkpoint import load_calibration, save_calibration
from .files import (CALIBRATED_MODEL, CALIBRATION, CHECKPOINT, HIST_PNG, PROXY_PNG, RANK_CSV,
                    RANK_JSON, RANK_PNG, RANK_TXT, SKIP_YAML, SPLIT_PNG, STAT_CSV, TARGET_DIR)
from .job import AnalysisResult, analysis_command, interrupted_note, run_analysis
from .measure import Runner, halves, head_tensors
from .ranking import spearman
from .target import find_target_model, search_prefix

__all__ = ["AnalysisResult", "CALIBRATED_MODEL", "CALIBRATION", "CHECKPOINT", "HIST_PNG",
           "PROXY_PNG", "RANK_CSV", "RANK_JSON", "RANK_PNG", "RANK_TXT", "Runner", "SKIP_YAML",
           "SPLIT_PNG", "STAT_CSV", "TARGET_DIR", "analysis_command", "find_target_model", "head_tensors",
           "interrupted_note", "load_calibration", "halves", "run_analysis",
           "save_calibration", "search_prefix", "snr_db", "spearman"]
