"""Benchmark: does the label-free fidelity predict the labelled mAP delta of INT8 variants?

  python bench/fidelity.py --config_path configs/yolov5n_coco_mini.yaml --out bench/results

Quantizes the model in several variants (algorithms, per-tensor weights, every conv int8), then
makes one pass per image set in which FP32 and every variant's QDQ ONNX (ONNX Runtime) see
each image: the same detections give the labelled mAP delta to FP32 (paired bootstrap
intervals) and the fidelity against FP32 (yoloquant.fidelity: mAP against FP32's detections
above a confidence, output SNR), at several confidences. Image sets: the val images and the
annotated train images calibration did not use (held-out); fidelity never reads their labels,
so the held-out set also stands for "extra unlabelled images" when it predicts the val delta.
Reports Spearman / Pearson between every fidelity component and the labelled deltas, and the
interval widths of both. Writes a Markdown table and a JSON copy to --out.
"""
import argparse
import copy
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import load_config  # noqa: E402
from yoloquant.evaluate import heldout_config  # noqa: E402
from yoloquant.fidelity import Recording, labelled, paired_fidelity_delta, record, score  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402
from yoloquant.ptq import QDQ_ONNX, quantize  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend  # noqa: E402
from yoloquant.stats import CI_NOTE, paired_delta  # noqa: E402
from yoloquant.validator import (Decoder, compare_to, postprocess_settings, preprocess_for,  # noqa: E402
                                 val_dataset)

ALL_INT8 = {"min_layer_snr_db": None}
PER_TENSOR = {"weight_quantize_type": "abs_max"}
VARIANTS = {  # name -> (algorithm, config overrides)
    "avg": ("avg", {}), "KL": ("KL", {}), "hist": ("hist", {}), "mse": ("mse", {}),
    "emd": ("emd", {}), "abs_max": ("abs_max", {}), "ptf": ("ptf", {}),
    "KL per-tensor": ("KL", PER_TENSOR), "KL all-int8": ("KL", ALL_INT8),
    "KL per-tensor all-int8": ("KL", {**PER_TENSOR, **ALL_INT8}),
    "avg per-tensor all-int8": ("avg", {**PER_TENSOR, **ALL_INT8}),
}
CONFS = (0.1, 0.25, 0.4, 0.55)


def quantize_variant(cfg, name: str, out: Path) -> dict:
    algo, overrides = VARIANTS[name]
    v = copy.deepcopy(cfg)
    v.PTQ.algo = algo
    for key, value in overrides.items():
        if key == "weight_quantize_type":
            v.PTQ.weight_quantize_type = value
        else:
            setattr(v, key, value)
    start = time.perf_counter()
    summary = quantize(v, out).summary
    return {"variant": name, "onnx": str(out / QDQ_ONNX), "job_seconds": round(time.perf_counter() - start, 1),
            "int8_convs": len(summary["quantized"]["onnx_conv_nodes"]),
            "float_convs": len(summary["kept_float"]["conv_reasons"]),
            "calibration_ids": summary["calibration"]["image_ids"]}


def concat(a: Recording, b: Recording) -> Recording:
    return dataclasses.replace(a, reference=a.reference + b.reference,
                               candidates=[x + y for x, y in zip(a.candidates, b.candidates)],
                               noise=[dataclasses.replace(x, signal=np.vstack([x.signal, y.signal]),
                                                          noise=np.vstack([x.noise, y.noise]))
                                      for x, y in zip(a.noise, b.noise)],
                               image_ids=a.image_ids + b.image_ids, infos=a.infos + b.infos)


def fidelity_values(rec: Recording) -> dict:
    """conf -> per variant Fidelity."""
    return {conf: [score(rec, i, conf) for i in range(len(rec.candidates))] for conf in CONFS}


def components(fid: dict) -> dict:
    """name -> per-variant values of every fidelity component (points / dB)."""
    out = {}
    for conf, found in fid.items():
        out[f"mAP50-95 vs FP32 @{conf}"] = [100 * f.map50_95.value for f in found]
        out[f"mAP50 vs FP32 @{conf}"] = [100 * f.map50.value for f in found]
    first = fid[CONFS[0]]
    out["output SNR dB"] = [f.snr_db.value for f in first]
    out["box SNR dB"] = [f.snr_parts_db["box"] for f in first]
    out["score SNR dB"] = [f.snr_parts_db["score"] for f in first]
    return out


def correlations(x: list, y: list) -> dict:
    from scipy import stats

    return {"spearman": float(stats.spearmanr(x, y)[0]), "pearson": float(stats.pearsonr(x, y)[0])}


def pair_widths(fid: list, results: list) -> dict:
    """For every pair of variants: widths of the paired labelled-delta interval and of the
    paired fidelity interval, and which of them exclude 0."""
    rows = []
    for i, j in itertools.combinations(range(len(fid)), 2):
        lab = paired_delta(results[i].matches, results[j].matches).map50_95
        f = paired_fidelity_delta(fid[i], fid[j])
        rows.append({"pair": [fid[i].name, fid[j].name], "labelled": [lab.value, lab.lo, lab.hi],
                     "fidelity": [f["map50_95"].value, f["map50_95"].lo, f["map50_95"].hi],
                     "snr": [f["snr_db"].value, f["snr_db"].lo, f["snr_db"].hi]})
    return rows


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fidelity_bench_") as tmp:
        return measure_in(args, Path(tmp))


def measure_in(args, work: Path) -> dict:
    cfg = load_config(args.config_path)
    variants = [quantize_variant(cfg, name, work / f"v{i}") for i, name in enumerate(args.variants)]
    for v in variants:
        print({k: v[k] for k in ("variant", "job_seconds", "int8_convs", "float_convs")}, flush=True)
    fp32 = OnnxRuntimeBackend(cfg.model_dir)
    preprocess = preprocess_for(cfg, fp32.input_shape)
    decoder = Decoder(cfg.output_layout, preprocess.input_size, postprocess_settings(cfg))
    held_cfg = heldout_config(cfg, variants[0]["calibration_ids"], work)
    sets = {"val": val_dataset(cfg, preprocess, max_images=args.max_images),
            "heldout": val_dataset(held_cfg, preprocess, max_images=args.max_images)}
    names = [v["variant"] for v in variants]
    recordings, results, fidelity, timing = {}, {}, {}, {}
    for set_name, dataset in sets.items():
        start = time.perf_counter()
        cands = [OnnxRuntimeBackend(v["onnx"]) for v in variants]
        recordings[set_name] = record(fp32, cands, dataset, decoder, cfg.workers, names)
        timing[f"record_{set_name}"] = round(time.perf_counter() - start, 1)
        results[set_name] = labelled(recordings[set_name], dataset)
        compare_to(results[set_name][0], results[set_name][1:])
        start = time.perf_counter()
        fidelity[set_name] = fidelity_values(recordings[set_name])
        timing[f"fidelity_{set_name}"] = round(time.perf_counter() - start, 1)
    fidelity["val+heldout"] = fidelity_values(concat(recordings["val"], recordings["heldout"]))
    return {"variants": variants, "results": results, "fidelity": fidelity, "timing": timing,
            "images": {k: len(d) for k, d in sets.items()}}


def analyse(m: dict) -> dict:
    delta = {s: [100 * r.delta.map50_95.value for r in m["results"][s][1:]] for s in ("val", "heldout")}
    delta["pooled"] = [(a + b) / 2 for a, b in zip(delta["val"], delta["heldout"])]
    cases = [("val", "val"), ("heldout", "heldout"), ("heldout", "val"), ("val", "heldout"),
             ("val+heldout", "pooled")]
    table = []
    for fid_set, target in cases:
        for comp, values in components(m["fidelity"][fid_set]).items():
            table.append({"fidelity_on": fid_set, "labelled_delta_on": target, "component": comp,
                          **correlations(values, delta[target])})
    ceiling = correlations(delta["val"], delta["heldout"])
    on_val, on_held = components(m["fidelity"]["val"]), components(m["fidelity"]["heldout"])
    reproducible = {comp: correlations(on_val[comp], on_held[comp]) for comp in on_val}
    return {"delta_points": delta, "correlations": table, "labelled_val_vs_heldout": ceiling,
            "fidelity_val_vs_heldout": reproducible}


def markdown(m: dict, a: dict, cfg_path: str) -> str:
    val, held = m["results"]["val"], m["results"]["heldout"]
    fv, fh = m["fidelity"]["val"][0.25], m["fidelity"]["heldout"][0.25]
    lines = [f"# Fidelity vs labelled mAP delta: {Path(cfg_path).stem}", "", machine_line(m["machine"]),
             f"FP32 (ONNX Runtime) mAP@0.5:0.95 {val[0].map50_95:.4f} on {m['images']['val']} val "
             f"images, {held[0].map50_95:.4f} on {m['images']['heldout']} held-out train images; "
             f"INT8 = each variant's QDQ ONNX on ONNX Runtime. Labelled delta in points, {CI_NOTE}. "
             "Fidelity at conf 0.25: mAP of the variant's detections against FP32's detections with "
             "score >= 0.25 (100 = identical), output SNR in dB, basic bootstrap intervals over images.",
             "", "| variant | int8 / float convs | job s | Δ val | Δ held-out | fidelity val | "
             "fidelity held-out | SNR dB val | SNR dB held-out |", "|---|---|---|---|---|---|---|---|---|"]
    for i, v in enumerate(m["variants"]):
        lines.append(f"| {v['variant']} | {v['int8_convs']} / {v['float_convs']} | {v['job_seconds']:.0f} "
                     f"| {val[i + 1].delta.map50_95.points()} | {held[i + 1].delta.map50_95.points()} "
                     f"| {fv[i].map50_95.points(signed=False)} | {fh[i].map50_95.points(signed=False)} "
                     f"| {fv[i].snr_db.value:.1f} [{fv[i].snr_db.lo:.1f}, {fv[i].snr_db.hi:.1f}] "
                     f"| {fh[i].snr_db.value:.1f} [{fh[i].snr_db.lo:.1f}, {fh[i].snr_db.hi:.1f}] |")
    c = a["labelled_val_vs_heldout"]
    lines += ["", f"Labelled delta on val vs on held-out, across the {len(m['variants'])} variants: "
              f"Spearman {c['spearman']:.2f}, Pearson {c['pearson']:.2f} (the labels' own "
              "reproducibility).", "",
              "Spearman / Pearson across the variants between a fidelity component (measured on "
              "the first set, labels unused) and the labelled delta (on the second; pooled: the "
              "mean of the val and held-out deltas):", ""]
    cases = list(dict.fromkeys((r["fidelity_on"], r["labelled_delta_on"]) for r in a["correlations"]))
    lines += ["| component | " + " | ".join(f"{f} -> Δ {t}" for f, t in cases) + " |",
              "|---|" + "---|" * len(cases)]
    cells: dict = {}
    for r in a["correlations"]:
        cells.setdefault(r["component"], []).append(f"{r['spearman']:.2f} / {r['pearson']:.2f}")
    lines += [f"| {comp} | " + " | ".join(v) + " |" for comp, v in cells.items()]
    lines += ["", "The same component measured on val vs on held-out (its own reproducibility; the "
              "labelled delta's is above): " + "; ".join(
                  f"{comp} {c['spearman']:.2f} / {c['pearson']:.2f}"
                  for comp, c in a["fidelity_val_vs_heldout"].items()) + "."]
    lines += ["", "Interval widths (95%, points; median over variants / pairs of variants):", ""]
    lines += [f"* {k}: {v}" for k, v in a["widths"].items()]
    return "\n".join(lines) + "\n"


def widths(m: dict, a: dict) -> dict:
    """Median interval widths: labelled delta, fidelity, and the same for paired comparisons
    of two variants, with the fidelity width also in labelled points (x the regression slope
    of the pooled labelled delta on the fidelity)."""
    out = {}
    comp = components(m["fidelity"]["val+heldout"])
    slope = float(np.polyfit(comp["mAP50-95 vs FP32 @0.25"], a["delta_points"]["pooled"], 1)[0])
    snr_slope = float(np.polyfit(comp["output SNR dB"], a["delta_points"]["pooled"], 1)[0])
    out["slope: labelled points per fidelity point (pooled, conf 0.25)"] = round(slope, 3)
    out["slope: labelled points per output SNR dB (pooled)"] = round(snr_slope, 3)
    for s in ("val", "heldout"):
        lab = [100 * (r.delta.map50_95.hi - r.delta.map50_95.lo) for r in m["results"][s][1:]]
        fid = [100 * (f.map50_95.hi - f.map50_95.lo) for f in m["fidelity"][s][0.25]]
        out[f"{s}: labelled delta vs FP32"] = round(float(np.median(lab)), 2)
        out[f"{s}: fidelity vs FP32 (fidelity points)"] = round(float(np.median(fid)), 2)
        out[f"{s}: fidelity vs FP32 (x slope)"] = round(float(np.median(fid)) * abs(slope), 2)
        pairs = m["pairs"][s]
        lab_w = [100 * (p["labelled"][2] - p["labelled"][1]) for p in pairs]
        fid_w = [100 * (p["fidelity"][2] - p["fidelity"][1]) * abs(slope) for p in pairs]
        out[f"{s}: pairs, labelled A-B"] = round(float(np.median(lab_w)), 2)
        out[f"{s}: pairs, fidelity A-B (x slope)"] = round(float(np.median(fid_w)), 2)
        snr_w = [(p["snr"][2] - p["snr"][1]) * abs(snr_slope) for p in pairs]
        out[f"{s}: pairs, output SNR A-B (x slope)"] = round(float(np.median(snr_w)), 2)
        out[f"{s}: pairs whose interval excludes 0, labelled / fidelity / SNR"] = (
            f"{sum(p['labelled'][1] > 0 or p['labelled'][2] < 0 for p in pairs)} / "
            f"{sum(p['fidelity'][1] > 0 or p['fidelity'][2] < 0 for p in pairs)} / "
            f"{sum(p['snr'][1] > 0 or p['snr'][2] < 0 for p in pairs)} of {len(pairs)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/yolov5n_coco_mini.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max_images", type=int, default=None,
                        help="the first N images of each set only (a quick check)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    setup_logging()
    start = time.perf_counter()
    m = measure(args)
    m["pairs"] = {s: pair_widths(m["fidelity"][s][0.25], m["results"][s][1:]) for s in ("val", "heldout")}
    m["machine"] = machine()
    a = analyse(m)
    a["widths"] = widths(m, a)
    m["timing"]["total"] = round(time.perf_counter() - start, 1)
    text = markdown(m, a, args.config_path)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config_path).stem
    (out / f"fidelity_{name}.md").write_text(text)
    write_json(out / f"fidelity_{name}.json", {
        "variants": m["variants"], "images": m["images"], "timing": m["timing"],
        "labelled": {s: [r.as_dict() for r in rs] for s, rs in m["results"].items()},
        "fidelity": {s: {str(c): [f.as_dict() | {"name": f.name} for f in fs] for c, fs in per.items()}
                     for s, per in m["fidelity"].items()},
        "pairs": m["pairs"], "analysis": a, "versions": package_versions(), "machine": m["machine"]})


if __name__ == "__main__":
    main()
