"""analysis.txt, sensitivity.csv/.json, statistic.csv and the figures."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from onnx import numpy_helper

from ..fileio import atomic_write, write_json, write_text
from ..provenance import machine, package_versions
from ..stats import snr_db
from .files import (HIST_PNG, PROXY_PNG, RANK_CSV, RANK_JSON, RANK_PNG, RANK_TXT, SPLIT_PNG,
                    STAT_CSV, TARGET_DIR)
from .ranking import trust_note

if TYPE_CHECKING:  # job imports this module
    from .job import AnalysisResult


HIST_LAYERS = 4  # layers per row of hist_compare.png (most / least sensitive)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else
                             (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in columns})
    write_text(path, buf.getvalue())

RANK_COLUMNS = ["rank", "paddle_weight", "onnx_node", "sensitivity", "noise_alone",
                "noise_removed", "snr_quant_only_db", "snr_float_only_db", "map_quant_only",
                "drop_quant_only", "map_float_only", "gain_float_only", "proxy", "seconds"]

STAT_COLUMNS = ["rank", "paddle_weight", "onnx_node", "weight_shape", "weight_min", "weight_max",
                "weight_mean", "weight_std", "weight_absmax_over_std", "weight_kurtosis",
                "weight_zero_fraction", "weight_channel_spread", "weight_rounding_snr_db",
                "act_min", "act_max", "act_std", "act_absmax_over_std", "act_threshold",
                "act_clipped_fraction", "out_threshold"]


def _short(node: str) -> str:
    return node[:-len("/Conv")] if node.endswith("/Conv") else node


def _pt(value: Optional[float], signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def _describe(meta: dict) -> list[str]:
    """What the columns mean, for the metric the run ranked by."""
    if meta["metric"] == "noise":
        how = ("sensitivity = alone + removed, as shares of the all-int8 model's head noise: "
               "alone = the noise with only this conv int8, removed = the noise gone when only "
               "it stays float" if not meta["proxy_only"] else
               "analysis_proxy_only: sensitivity = alone, the share of the all-int8 model's "
               "head noise this conv adds when only it is int8")
        return [how + f"; head noise: raw head outputs against float on {meta['noise_images']} "
                "images (noise averaged over the head's scales), no labels used."]
    lines = ["quant-only: only this conv quantized (drop vs float); float-only: every conv "
             "quantized but this one (gain vs all int8).",
             "sensitivity = drop + gain, in mAP points; SNR: raw head outputs vs float on "
             f"{meta['noise_images']} images (noise averaged over the head's scales);"]
    if meta["proxy_only"]:
        lines.append("analysis_proxy_only: ranked by the head noise this conv adds alone (no "
                     "per-layer mAP).")
    return lines


def _correlation_lines(rho: dict, meta: dict) -> list[str]:
    lines = [f"split-half Spearman = {_fmt(rho['split_half'])} (the ranking made on the even "
             "images against the one made on the odd images)", f"  -> {trust_note(rho)}"]
    if rho.get("proxy_vs_map") is not None:
        lines.append(f"Spearman(quant-only drop, float-only gain) = {_fmt(rho['directions'])} "
                     "(the two mAP directions agree when high; near 0: noise)")
        lines.append(f"Spearman(proxy, mAP sensitivity) = {_fmt(rho['proxy_vs_map'])} (proxy "
                     f"vs quant-only drop {_fmt(rho['quant_only'])}; float-only SNR vs gain "
                     f"{_fmt(rho['float_only'])})")
    elif rho.get("directions") is not None:
        lines.append(f"Spearman(alone, removed) = {_fmt(rho['directions'])} (the two "
                     "directions rank the convs alike when high)")
    return lines


def _table(rows: list[dict], metric: str) -> list[str]:
    if metric == "noise":
        lines = [f"{'rank':>4}  {'paddle weight':<16} {'onnx conv':<28} {'sens.':>7} "
                 f"{'alone':>7} {'removed':>7} {'q-only SNR':>10} {'f-only SNR':>10}"]
        for r in rows:
            lines.append(f"{r['rank']:>4}  {r['paddle_weight']:<16} "
                         f"{_short(r['onnx_node'])[:28]:<28} {_pct(r['sensitivity'])} "
                         f"{_pct(r['noise_alone'])} {_pct(r['noise_removed'])} "
                         f"{_db(r['snr_quant_only_db'])} {_db(r['snr_float_only_db'])}")
        return lines
    lines = [f"{'rank':>4}  {'paddle weight':<16} {'onnx conv':<28} {'sens.':>6} "
             f"{'q-only mAP':>10} {'drop':>6} {'f-only mAP':>10} {'gain':>6} "
             f"{'q-only SNR':>10} {'f-only SNR':>10}"]
    for r in rows:
        q = "-" if r["map_quant_only"] is None else f"{r['map_quant_only']:.4f}"
        f = "-" if r["map_float_only"] is None else f"{r['map_float_only']:.4f}"
        sens = _pt(r["sensitivity"]) if r["drop_quant_only"] is not None else _pct(r["sensitivity"])
        lines.append(
            f"{r['rank']:>4}  {r['paddle_weight']:<16} {_short(r['onnx_node'])[:28]:<28} "
            f"{sens:>6} {q:>10} {_pt(r['drop_quant_only']):>6} {f:>10} "
            f"{_pt(r['gain_float_only']):>6} {_db(r['snr_quant_only_db'])} "
            f"{_db(r['snr_float_only_db'])}")
    return lines


def format_report(rows: list[dict], reference: dict, rho: dict, meta: dict,
                  target: Optional[dict]) -> str:
    lines = [
        "Quantization sensitivity per conv (yoloquant analysis.py)",
        "",
        f"model:        {meta['model']}",
        f"evaluation:   {meta['eval_images']} images of {meta['anno_path']} (mAP@0.5:0.95)",
        f"calibration:  {meta['algo']} on {meta['calib_images']} images, computed once",
        f"ranked by:    {meta['metric']}" + (" (quant-only direction)" if meta["proxy_only"] else ""),
        f"float:        mAP {reference['float_map']:.4f}",
        f"all int8:     mAP {reference['int8_map']:.4f} "
        f"({_pt(reference['int8_map'] - reference['float_map'])} points), "
        f"head SNR {snr_db(reference['int8_nsr']):.1f} dB",
        "",
        *_describe(meta),
        *_correlation_lines(rho, meta),
        "",
        *_table(rows, meta["metric"]),
    ]
    if target:
        lines += ["", f"target_metric {target['target']:.4f}: keep {len(target['float_layers'])} "
                  f"conv(s) float -> mAP {target['confirmed_map']:.4f} measured on the saved "
                  f"{TARGET_DIR}/model_int8.onnx ({target['full_evaluations']} evaluations, "
                  f"{target['seconds']:.0f} s)",
                  f"skip_tensor_list: {json.dumps(target['skip_tensor_list'])}"]
        d = target.get("all_int8_delta")
        if d:
            lo, hi = d["ci95"]
            lines.append(f"deployed all-int8 model vs float on these images: {100 * d['delta']:+.2f} "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}] points (95% paired interval)"
                         + ("; the interval reaches the target: whether any conv must stay float "
                            "is within the noise of these images" if d["reaches_target"] else ""))
    return "\n".join(lines) + "\n"


def _pct(v: Optional[float]) -> str:
    return f"{'-':>7}" if v is None else f"{100 * v:>6.1f}%"


def _db(v: Optional[float]) -> str:
    return f"{'-':>10}" if v is None else f"{v:>7.1f} dB"


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_rank(rows: list[dict], reference: dict, meta: dict, path: Path) -> None:
    """Horizontal bars, most sensitive conv at the top: both directions."""
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(10, 1.6 + 0.24 * n))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    labels = [f"{r['paddle_weight']}  {_short(r['onnx_node'])}" for r in rows]
    if meta["metric"] == "noise" or meta["proxy_only"]:
        both = not meta["proxy_only"]
        ax.barh(y - 0.2 * both, [100 * r["noise_alone"] for r in rows], height=0.4 if both else 0.8,
                color="tab:red", label="noise with only this conv int8")
        if both:
            ax.barh(y + 0.2, [100 * r["noise_removed"] for r in rows], height=0.4,
                    color="tab:blue", label="noise gone when only this conv stays float")
            ax.scatter([100 * r["sensitivity"] for r in rows], y, marker="D", s=12,
                       color="black", zorder=3, label="sensitivity = alone + removed")
        ax.set_xlabel("share of the all-int8 model's head-output noise (%)")
    else:
        ax.barh(y - 0.2, [100 * r["drop_quant_only"] for r in rows], height=0.4,
                color="tab:red", label="drop when only this conv is int8")
        ax.barh(y + 0.2, [100 * r["gain_float_only"] for r in rows], height=0.4,
                color="tab:blue", label="gain when only this conv stays float")
        ax.scatter([100 * r["sensitivity"] for r in rows], y, marker="D", s=12, color="black",
                   zorder=3, label="sensitivity = drop + gain")
        ax.set_xlabel("mAP@0.5:0.95 points")
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{meta['model_name']}: sensitivity per conv, most sensitive first\n"
                 f"{meta['eval_images']} images; float {reference['float_map']:.4f}, "
                 f"all int8 {reference['int8_map']:.4f}", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_hist(rows: list[dict], stats: dict, cal, path: Path) -> None:
    """Weight histograms: the most sensitive convs (top row) against the least (bottom row)."""
    from matplotlib.figure import Figure

    k = max(1, min(HIST_LAYERS, len(rows) // 2)) if len(rows) > 1 else 1
    groups = [("most sensitive", rows[:k], "tab:red")]
    if len(rows) > 1:
        groups.append(("least sensitive", rows[-k:][::-1], "tab:blue"))
    inits = {i.name: i for i in cal.onnx_model.graph.initializer}
    nodes = {n.name: n for n in cal.onnx_model.graph.node}
    fig = Figure(figsize=(3.4 * k, 3.0 * len(groups)))
    for g, (title, group, color) in enumerate(groups):
        for j, row in enumerate(group):
            ax = fig.add_subplot(len(groups), k, g * k + j + 1)
            w = numpy_helper.to_array(inits[nodes[row["onnx_node"]].input[1]]).ravel()
            ax.hist(w, bins=120, color=color, alpha=0.8, log=True)
            s = stats[row["onnx_node"]]
            score = (f"{_pt(row['sensitivity'])} pt" if row["drop_quant_only"] is not None
                     else f"{100 * row['sensitivity']:.1f}% of the noise")
            ax.set_title(f"{title} #{row['rank']}: {row['paddle_weight']}\n"
                         f"{_short(row['onnx_node'])[-30:]}  ({score})", fontsize=8)
            ax.text(0.02, 0.97, f"kurtosis {_num(s['weight_kurtosis'])}\n"
                    f"absmax/std {_num(s['weight_absmax_over_std'])}\n"
                    f"zero in int8 {100 * s['weight_zero_fraction']:.0f}%",
                    transform=ax.transAxes, fontsize=7, va="top")
            ax.tick_params(labelsize=7)
    fig.suptitle("weight histograms (log count)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, path)


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot_proxy(rows: list[dict], rho: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([r["snr_quant_only_db"] for r in rows],
               [100 * (r["drop_quant_only"] + r["gain_float_only"]) for r in rows], s=14)
    ax.invert_xaxis()  # low SNR (a noisier conv) to the right, like a high sensitivity
    ax.set_xlabel("proxy: head SNR with only this conv int8 (dB)")
    ax.set_ylabel("mAP sensitivity (drop + gain, points)")
    ax.set_title(f"proxy vs mAP: Spearman {_fmt(rho['proxy_vs_map'])}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_split_half(rows: list[dict], rho: dict, meta: dict, path: Path) -> None:
    """Each conv's sensitivity measured on the even images against the odd ones: on the
    diagonal when the ranking is reproducible."""
    from matplotlib.figure import Figure

    scale, unit = (100, "mAP points") if rows and rows[0]["drop_quant_only"] is not None \
        and meta["metric"] == "map" else (100, "% of the all-int8 noise")
    a = [scale * r["sensitivity_halves"][0] for r in rows]
    b = [scale * r["sensitivity_halves"][1] for r in rows]
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(a, b, s=14)
    lo, hi = min(a + b), max(a + b)
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.6)
    ax.set_xlabel(f"sensitivity on the even images ({unit})")
    ax.set_ylabel(f"sensitivity on the odd images ({unit})")
    ax.set_title(f"split-half Spearman {_fmt(rho['split_half'])}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def _write_outputs(cfg, cal, result: AnalysisResult, stats: dict, meta: dict,
                   target: Optional[dict], figures: bool = True) -> None:
    save, rows = result.save_dir, result.rows
    _write_csv(save / RANK_CSV, rows, RANK_COLUMNS)
    stat_rows = [{**stats[r["onnx_node"]], "rank": r["rank"], "paddle_weight": r["paddle_weight"],
                  "onnx_node": r["onnx_node"]} for r in rows]
    _write_csv(save / STAT_CSV, stat_rows, STAT_COLUMNS)
    write_json(save / RANK_JSON, {
        "split_half_spearman": result.spearman.get("split_half"),
        "meta": meta, "reference": result.reference, "spearman": result.spearman,
        "spearman_note": trust_note(result.spearman),
        "layers": [{**r, "statistics": stats[r["onnx_node"]]} for r in rows],
        "target": target, "seconds": result.seconds,
        "versions": package_versions(), "machine": machine()})
    write_text(save / RANK_TXT, format_report(rows, result.reference, result.spearman, meta,
                                               target))
    if figures:
        plot_rank(rows, result.reference, meta, save / RANK_PNG)
        if cfg.plot_hist:
            plot_hist(rows, stats, cal, save / HIST_PNG)
        if result.spearman.get("proxy_vs_map") is not None:
            plot_proxy(rows, result.spearman, save / PROXY_PNG)
        if result.spearman.get("split_half") is not None:
            plot_split_half(rows, result.spearman, meta, save / SPLIT_PNG)

