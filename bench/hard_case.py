"""Benchmark: the seed's hard case, where analysis and reconstruction have to visibly win.

  python bench/hard_case.py --config_path configs/yolov5n_coco_mini.yaml --work /tmp/hard \
      --out bench/results

The hard case is the seed's analysis setting: KL calibration, per-tensor weights
(`weight_quantize_type: abs_max`) and every conv int8 (`min_layer_snr_db: null`). On it:

1. FP32 and plain PTQ, on val and on the held-out train images (those calibration did not use);
2. analysis.py with its default settings (noise ranking on up to 128 val images): the split-half
   Spearman of its ranking;
3. the top-k ranked convs kept float against k random convs (several draws), held-out mAP with
   paired intervals against PTQ;
4. the target search (`target_drop`) made on the analysis images, checked on held-out images;
5. fine_tune.py's AdaRound (layer-wise), BRECQ (region-wise) and QDrop (region-wise with
   simulated activation quantization), with float and with quantized-so-far inputs: the share
   of the PTQ loss recovered on held-out images, with its paired bootstrap interval. On request
   (`--methods`) also the variants QDrop-LSQ (learned activation steps, `recon_act_scale`) and
   QDrop+BC (`conv_bias_correction` after the rounding), and both together.

`--case easy` runs step 5 on the config as given (the defaults) instead: fine_tune must not be
worse than plain PTQ there. Every artifact goes into --work and is reused when it is already
complete (delete a folder to redo it); the evaluations are redone each run, in one process.
"""
import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import load_config  # noqa: E402
from yoloquant.evaluate import evaluate_backend, heldout_config  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402
from yoloquant.ptq import QDQ_ONNX, SUMMARY, quantize  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend, PaddleInferenceBackend, PaddleModelFiles  # noqa: E402
from yoloquant.stats import CI_NOTE, bootstrap_interval, paired_delta, resample_weights  # noqa: E402
from yoloquant.validator import compare_to  # noqa: E402

TOP_K = (3, 5, 10)
RANDOM_DRAWS = 5
TARGET_DROP = 1.0  # points below float on the analysis images
RECON = {  # name -> (recon_level, simulate_activation_quant, config keys set for it)
    "AdaRound": ("layer-wise", False, {}), "BRECQ": ("region-wise", False, {}),
    "QDrop": ("region-wise", True, {}),
    # variants, run on request (--methods)
    "QDrop-LSQ": ("region-wise", True, {"recon_act_scale": "learned"}),
    "QDrop+BC": ("region-wise", True, {"conv_bias_correction": True}),
    "QDrop-LSQ+BC": ("region-wise", True, {"recon_act_scale": "learned", "conv_bias_correction": True})}
DEFAULT_METHODS = ("AdaRound", "BRECQ", "QDrop")
RECON_INPUTS = ("float", "quantized")


def hard_config(cfg):
    """The seed's analysis setting on `cfg`'s model and data."""
    hard = copy.deepcopy(cfg)
    hard.PTQ.algo = "KL"
    hard.PTQ.weight_quantize_type = "abs_max"
    hard.min_layer_snr_db = None
    return hard


def done(folder: Path, name: str = SUMMARY) -> bool:
    return (folder / name).is_file()


# ---- the artifacts ---------------------------------------------------------------------------
def run_ptq(cfg, work: Path) -> dict:
    out = work / "ptq"
    if not done(out):
        quantize(cfg, out)
    return json.loads((out / SUMMARY).read_text())


def run_analysis_job(cfg, work: Path):
    from yoloquant.analysis import RANK_JSON, run_analysis

    save = work / "analysis"
    acfg = dataclasses.replace(cfg, save_dir=str(save), get_target_quant_model=True,
                               target_metric=None, target_drop=TARGET_DROP)
    result = run_analysis(acfg, resume=(save / "analysis_checkpoint.json").is_file(), progress=False)
    return acfg, result, json.loads((save / RANK_JSON).read_text())


def skip_models(acfg, rows: list, work: Path, seed: int = 0) -> dict:
    """name -> QDQ ONNX path: PTQ (nothing float), top-k, and k random convs, all on the
    analysis calibration (the same activation scales), laid out for the deploy backend."""
    import onnx

    from yoloquant.analysis import CALIBRATION, load_calibration
    from yoloquant.deploy_onnx import build_qdq

    cal = load_calibration(acfg, Path(acfg.save_dir) / CALIBRATION)
    order = [r["onnx_node"] for r in rows]
    rng = np.random.default_rng(seed)
    variants = {"PTQ (analysis calibration)": []}
    for k in TOP_K:
        variants[f"top-{k} float"] = order[:k]
        for d in range(RANDOM_DRAWS):
            variants[f"random-{k} float #{d}"] = [order[i] for i in rng.choice(len(order), k, replace=False)]
    paths = {}
    for i, (name, nodes) in enumerate(variants.items()):
        path = work / "skip" / f"v{i}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build_qdq(cal, nodes), str(path))
        paths[name] = (path, nodes)
    return paths


def run_fine_tunes(cfg, work: Path, inputs=RECON_INPUTS, methods=DEFAULT_METHODS) -> dict:
    from yoloquant.fine_tune import fine_tune, settings_from

    found = {}
    for method in methods:
        level, simulate, keys = RECON[method]
        for source in inputs:
            out = work / f"ft_{method}_{source}"
            if not done(out):
                start = time.perf_counter()
                job = dataclasses.replace(cfg, recon_input=source, **keys)
                settings = settings_from(job, level, simulate, epochs=25, lr=0.01, limit=6)
                fine_tune(job, out, settings, progress=False)
                print(f"{method} ({source} inputs): {time.perf_counter() - start:.0f} s", flush=True)
            found[f"{method} ({source} inputs)"] = out
    return found


# ---- scoring ---------------------------------------------------------------------------------
def score(cfg, backend, label: str):
    r = evaluate_backend(cfg, backend)
    r.model = label
    return r


def recovery(fp32, ptq, cand, weights: np.ndarray) -> dict:
    """Share of the PTQ loss the candidate wins back, (cand - ptq) / (fp32 - ptq), with a basic
    bootstrap interval over the same image resamples; and the paired delta cand - ptq."""
    full = np.vstack([np.ones((1, fp32.matches.images)), weights])
    a, p, c = (m.matches.average_precision(full)[0] for m in (fp32, ptq, cand))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (c - p) / (a - p)
    rec = bootstrap_interval(float(ratio[0]), ratio[1:][np.isfinite(ratio[1:])])
    gain = paired_delta(ptq.matches, cand.matches, weights=weights).map50_95
    return {"recovered": [rec.value, rec.lo, rec.hi], "gain": [gain.value, gain.lo, gain.hi]}


def score_sets(sets: dict, models: dict) -> dict:
    """set name -> {model name: EvalResult}, every model compared to FP32 on that set."""
    out = {}
    for set_name, set_cfg in sets.items():
        rows = {name: score(set_cfg, make(), name) for name, make in models.items()}
        compare_to(rows["FP32"], [r for n, r in rows.items() if n != "FP32"])
        out[set_name] = rows
        print(f"{set_name}: " + ", ".join(f"{n} {r.map50_95:.4f}" for n, r in rows.items()), flush=True)
    return out


def onnx_model(path):
    return lambda: OnnxRuntimeBackend(path)


def paddle_model(folder):
    return lambda: PaddleInferenceBackend(PaddleModelFiles.find(folder), int8=True)


# ---- the report ------------------------------------------------------------------------------
def row_cells(scores: dict, name: str, base: str, weights: dict) -> list[str]:
    if "Paddle" in name:  # each runtime against its own PTQ
        base = "PTQ (Paddle int8)"
    cells = []
    for set_name, rows in scores.items():
        r = rows[name]
        d = r.delta.map50_95.points() if r.delta else ""
        cells.append(f"{r.map50_95:.4f} | {d}")
        if name not in ("FP32", base):
            rc = recovery(rows["FP32"], rows[base], r, weights[set_name])
            lo_pct = f"{100 * rc['recovered'][0]:.0f}% [{100 * rc['recovered'][1]:.0f}, {100 * rc['recovered'][2]:.0f}]"
            g = rc["gain"]
            cells.append(f"{lo_pct} | {100 * g[0]:+.2f} [{100 * g[1]:+.2f}, {100 * g[2]:+.2f}]")
        else:
            cells.append(" | ")
    return cells


def table(title: str, scores: dict, names: list, base: str, weights: dict) -> list[str]:
    head = "| model | " + " | ".join(f"{s} mAP | Δ vs FP32 | recovered of PTQ loss | Δ vs PTQ"
                                      for s in scores) + " |"
    lines = [f"### {title}", "", head, "|---|" + "---|---|---|---|" * len(scores)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(row_cells(scores, name, base, weights)) + " |")
    return lines + [""]


def random_summary(scores: dict, k: int, base: str, weights: dict) -> str:
    parts = []
    for set_name, rows in scores.items():
        rand = [rows[f"random-{k} float #{d}"] for d in range(RANDOM_DRAWS)]
        top = rows[f"top-{k} float"]
        mean_gain = paired_delta(rows[base].matches, [r.matches for r in rand], weights=weights[set_name]).map50_95
        vs = paired_delta(rows[f"random-{k} float #0"].matches, top.matches, weights=weights[set_name])
        top_vs_mean = paired_delta(rows[base].matches, top.matches, weights=weights[set_name]).map50_95
        beat = sum(top.map50_95 > r.map50_95 for r in rand)
        parts.append(f"{set_name}: top-{k} {100 * top_vs_mean.value:+.2f} vs random-{k} mean "
                     f"{mean_gain.points()} over PTQ; top beats {beat}/{RANDOM_DRAWS} draws "
                     f"(top - draw #0 {vs.map50_95.points()})")
    return "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/yolov5n_coco_mini.yaml")
    p.add_argument("--work", required=True, help="folder for the artifacts (reused across runs)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--case", choices=("hard", "easy"), default="hard")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(RECON))
    p.add_argument("--inputs", nargs="+", default=list(RECON_INPUTS), choices=list(RECON_INPUTS))
    p.add_argument("--no_analysis", action="store_true", help="skip steps 2-4")
    p.add_argument("--tag", default="", help="appended to the result files' names, so a partial "
                   "run (e.g. --no_analysis --methods BRECQ) does not replace a whole one")
    args = p.parse_args()
    setup_logging(verbose=False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_cfg = load_config(args.config_path)
    cfg = hard_config(base_cfg) if args.case == "hard" else base_cfg
    started = time.perf_counter()
    ptq = run_ptq(cfg, work)
    sets = {"val": cfg, "held-out": heldout_config(cfg, ptq["calibration"]["image_ids"], work)}
    models = {"FP32": onnx_model(cfg.model_dir), "PTQ": onnx_model(work / "ptq" / QDQ_ONNX),
              "PTQ (Paddle int8)": paddle_model(work / "ptq")}
    report = {"machine": machine(), "versions": package_versions(), "config": args.config_path,
              "case": args.case, "calibration_images": len(ptq["calibration"]["image_ids"]),
              "int8_convs": len(ptq["quantized"]["onnx_conv_nodes"])}
    skip_names, analysis = [], None
    if args.case == "hard" and not args.no_analysis:
        acfg, result, sensitivity = run_analysis_job(cfg, work)
        analysis = {"split_half_spearman": sensitivity.get("split_half_spearman"),
                    "ranking": [r["onnx_node"] for r in result.rows][:10],
                    "target": {k: result.target.get(k) for k in ("target", "target_drop", "float_layers",
                                                                  "confirmed_map", "met")} if result.target else None,
                    "images": sensitivity["meta"]["eval_images"], "seconds": result.seconds}
        for name, (path, nodes) in skip_models(acfg, result.rows, work).items():
            models[name] = onnx_model(path)
            skip_names.append(name)
        from yoloquant.analysis import TARGET_DIR

        models["target model (analysis)"] = onnx_model(Path(acfg.save_dir) / TARGET_DIR / QDQ_ONNX)
        skip_names.append("target model (analysis)")
    ft = run_fine_tunes(cfg, work, tuple(args.inputs), tuple(args.methods))
    ft_info = {}
    for name, folder in ft.items():
        models[name] = onnx_model(folder / QDQ_ONNX)
        models[name + " Paddle int8"] = paddle_model(folder)
        summary = json.loads((folder / SUMMARY).read_text())
        rs = summary["reconstruction"]
        ft_info[name] = {"deployed": rs["deployed"], "guard": rs["guard"],
                         "seconds": summary["seconds"].get("reconstruction")}
    scores = score_sets(sets, models)
    weights = {s: resample_weights(rows["FP32"].matches.images) for s, rows in scores.items()}
    report.update(analysis=analysis, fine_tune=ft_info, seconds=round(time.perf_counter() - started),
                  results={s: {n: r.as_dict() for n, r in rows.items()} for s, rows in scores.items()})
    for s, rows in scores.items():
        for n, r in rows.items():
            base = "PTQ (Paddle int8)" if "Paddle" in n else "PTQ"
            if n not in ("FP32", base):
                report["results"][s][n]["vs_ptq"] = recovery(rows["FP32"], rows[base], r, weights[s])
    suffixes = ("" if args.case == "hard" else "_easy") + (f"_{args.tag}" if args.tag else "")
    stem = f"hard_case_{Path(args.config_path).stem}{suffixes}"
    write_json(Path(args.out) / f"{stem}.json", report)
    lines = [f"# {'Hard' if args.case == 'hard' else 'Easy'} case: {Path(args.config_path).stem}", "",
             machine_line(report["machine"]), "",
             f"Setting: {'KL, per-tensor weights (abs_max), every conv int8 (min_layer_snr_db: null)' if args.case == 'hard' else 'the config as given (defaults)'}; "
             f"{report['calibration_images']} calibration images; {report['int8_convs']} int8 convs in PTQ. "
             f"INT8 rows are the QDQ ONNX on ONNX Runtime unless marked Paddle. Δ in points, {CI_NOTE} "
             "'recovered' = (model - PTQ) / (FP32 - PTQ), basic bootstrap interval over the same "
             "image resamples. held-out = the annotated train images calibration did not use.", ""]
    base_names = ["FP32", "PTQ", "PTQ (Paddle int8)"]
    if analysis:
        lines += [f"analysis.py (defaults: {analysis['images']} val images, noise ranking): split-half "
                  f"Spearman **{analysis['split_half_spearman']:.3f}**; top ranked: "
                  + ", ".join(analysis["ranking"][:5]) + ".", ""]
        if analysis["target"]:
            t = analysis["target"]
            lines += [f"Target search (target_drop {TARGET_DROP} point on the analysis images): "
                      f"{len(t['float_layers'])} convs float, {t['confirmed_map']:.4f} >= {t['target']:.4f} "
                      f"on the analysis images (met: {t['met']}); on held-out see the table.", ""]
        lines += table("Skipping layers", scores, base_names + skip_names, "PTQ", weights)
        lines += [f"- k={k}: " + random_summary(scores, k, "PTQ", weights) for k in TOP_K] + [""]
    ft_names = [n for name in ft for n in (name, name + " Paddle int8")]
    lines += table("Reconstruction (fine_tune.py, defaults: 25 epochs, lr 0.01)", scores,
                   base_names + ft_names, "PTQ", weights)
    lines += ["Deployed rounding (guard on the last calibration images): " + "; ".join(
        f"{n}: {i['deployed']} ({i['seconds']:.0f} s)" for n, i in ft_info.items()) + ".", "",
              f"Whole run {report['seconds']} s."]
    (Path(args.out) / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
