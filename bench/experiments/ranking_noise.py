"""Experiment: which noise ranking of analysis.py is reproducible across image halves?

  python bench/experiments/ranking_noise.py --config_path configs/yolov6lite_m_320_ptq.yaml \
      --work /tmp/rank_noise [--hard]

Measures, for every conv, the head noise against float of (a) the model with only that conv int8
and (b) every conv int8 but it, per image and head tensor, on all val images; saves the arrays
(noise.npz) and prints the split-half Spearman of several ways to turn them into a ranking key
(sum vs per-image log mean; alone, removed, both; 64 vs all images).
"""
import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # yoloquant and bench

from yoloquant.analysis.images import load_eval_images  # noqa: E402
from yoloquant.analysis.measure import RANK_LAYOUT, Runner, head_tensors  # noqa: E402
from yoloquant.analysis.ranking import spearman  # noqa: E402
from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import load_config  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend  # noqa: E402


def analysis_calibration(cfg):
    """Calibrated as analysis.py does: post_quant's automatic float choices off."""
    from yoloquant.ptq import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        return calibrate(dataclasses.replace(cfg, min_layer_snr_db=None, keep_regression_float=False), tmp)


def measure(cfg, work: Path) -> dict:
    from yoloquant.deploy_onnx import build_qdq

    out = work / "noise.npz"
    if out.is_file():
        return dict(np.load(out, allow_pickle=True))
    probe = OnnxRuntimeBackend(cfg.model_dir)
    images = load_eval_images(cfg, probe.input_shape)
    cal = analysis_calibration(cfg)
    heads = head_tensors(cal.onnx_model)
    runner = Runner(images, heads, 2)
    runner.reference = runner.reference_of(cal.onnx_model)
    nodes = [p.node_name for p in cal.conv_params]
    int8 = runner.measure(build_qdq(cal, backend=RANK_LAYOUT), with_map=False).noise
    alone, removed = [], []
    for i, node in enumerate(nodes):
        alone.append(runner.measure(build_qdq(cal, [n for n in nodes if n != node], backend=RANK_LAYOUT),
                                    with_map=False).noise)
        removed.append(runner.measure(build_qdq(cal, [node], backend=RANK_LAYOUT), with_map=False).noise)
        print(f"[{i + 1}/{len(nodes)}] {node}", flush=True)
    arrays = {"nodes": np.array(nodes), "signal": runner.reference.signal, "int8": int8,
              "alone": np.array(alone), "float_only": np.array(removed)}
    np.savez(out, **arrays)
    return arrays


def keys(a: dict, idx: np.ndarray) -> dict:
    """Ranking keys per conv from the images `idx`."""
    sig, int8 = a["signal"][idx], a["int8"][idx]  # (images, heads)
    alone, fo = a["alone"][:, idx], a["float_only"][:, idx]  # (convs, images, heads)
    eps = 1e-30

    def pooled(noise):  # current: sum over images / sum of signal, mean over heads
        return (noise.sum(axis=1) / sig.sum(axis=0)).mean(axis=1)

    def logmean(noise):  # per image and head NSR, mean of its log
        return np.log((noise + eps) / (sig + eps)).mean(axis=(1, 2))

    ref_p = (int8.sum(axis=0) / sig.sum(axis=0)).mean()
    out = {"pooled alone": pooled(alone), "pooled removed": 1 - pooled(fo) / ref_p}
    out["pooled both (current)"] = out["pooled alone"] / ref_p + out["pooled removed"]
    out["logmean alone"] = logmean(alone)
    # removed in the log domain: log of int8 noise over float-only noise, per image and head
    out["logmean removed"] = np.log((int8 + eps) / (fo + eps)).mean(axis=(1, 2))
    la, lr = out["logmean alone"], out["logmean removed"]
    out["rank sum logmean"] = rankdata(la) + rankdata(lr)
    # the two log directions on one scale (each in its standard deviations over the convs)
    out["z sum logmean"] = (la - la.mean()) / la.std() + (lr - lr.mean()) / lr.std()
    # per-image NSR share, averaged (each image counts the same)
    share = (alone / (int8 + eps)).mean(axis=(1, 2))
    out["mean share alone"] = share
    out["mean share both"] = share + (1 - fo / (int8 + eps)).mean(axis=(1, 2))
    return out


def top_k(cfg, a: dict, work: Path, names=("pooled both (current)", "z sum logmean", "rank sum logmean",
                                         "logmean alone"), ks=(3, 5, 10)) -> None:
    """Held-out and val mAP of PTQ with the top-k convs of each ranking float (deployed layout),
    paired against PTQ: does a more reproducible key still find the convs that matter?"""
    import onnx

    from bench.hard_case import recovery, score
    from yoloquant.evaluate import heldout_config
    from yoloquant.deploy_onnx import build_qdq
    from yoloquant.stats import resample_weights

    cal = analysis_calibration(cfg)
    sets = {"val": cfg, "held-out": heldout_config(cfg, cal.image_ids, work)}
    full = keys(a, np.arange(min(64, a["signal"].shape[0])))
    nodes = list(a["nodes"])
    variants = {"PTQ": []}
    for name in names:
        order = [nodes[i] for i in np.argsort(-full[name], kind="stable")]
        for k in ks:
            variants[f"{name} top-{k}"] = order[:k]
    paths = {}
    for i, (name, skip) in enumerate(variants.items()):
        paths[name] = work / f"topk_{i}.onnx"
        onnx.save(build_qdq(cal, skip), str(paths[name]))
    for set_name, set_cfg in sets.items():
        fp32 = score(set_cfg, OnnxRuntimeBackend(cfg.model_dir), "FP32")
        rows = {n: score(set_cfg, OnnxRuntimeBackend(p), n) for n, p in paths.items()}
        weights = resample_weights(fp32.matches.images)
        print(f"\n{set_name}: FP32 {fp32.map50_95:.4f}, PTQ {rows['PTQ'].map50_95:.4f}")
        for n, r in rows.items():
            if n == "PTQ":
                continue
            rc = recovery(fp32, rows["PTQ"], r, weights)["recovered"]
            print(f"  {n:36s} {r.map50_95:.4f}  recovered {100 * rc[0]:.0f}% [{100 * rc[1]:.0f}, {100 * rc[2]:.0f}]",
                  flush=True)


def report(a: dict) -> None:
    n = a["signal"].shape[0]
    for count in sorted({64, n}):
        if count > n:
            continue
        idx = np.arange(count)
        h0, h1 = keys(a, idx[0::2]), keys(a, idx[1::2])
        print(f"\n{count} images, halves of {count // 2}:")
        for name in h0:
            print(f"  {name:24s} split-half Spearman {spearman(list(h0[name]), list(h1[name])):.3f}")
        full = keys(a, idx)
        print(f"  alone vs removed (logmean): {spearman(list(full['logmean alone']), list(full['logmean removed'])):.3f}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config_path", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--hard", action="store_true", help="KL, per-tensor weights, every conv int8")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--top_k", action="store_true", help="also score the top-k float models of each key")
    args = p.parse_args()
    setup_logging(None)
    cfg = load_config(args.config_path)
    cfg = dataclasses.replace(cfg, analysis_max_images=args.max_images, analysis_metric="noise")
    if args.hard:
        from bench.hard_case import hard_config

        cfg = hard_config(cfg)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    arrays = measure(cfg, work)
    report(arrays)
    if args.top_k:
        top_k(cfg, arrays, work)


if __name__ == "__main__":
    main()
