"""Ranking the convs by sensitivity, and how far the measures agree (Spearman)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .measure import snr_db


def spearman(a: list, b: list) -> Optional[float]:
    """Spearman rank correlation (ties get their average rank); None when undefined."""
    from scipy.stats import rankdata

    if len(a) < 3:
        return None
    ra, rb = rankdata(a), rankdata(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_layers(results: dict, layers: list[str], reference: dict, onnx_to_paddle: dict,
                proxy_only: bool) -> list[dict]:
    """One row per layer, most sensitive first."""
    rows = []
    for node in layers:
        r = results[node]
        row = {"paddle_weight": onnx_to_paddle.get(node, ""), "onnx_node": node,
               "map_quant_only": r["map_quant_only"], "map_float_only": r["map_float_only"],
               "drop_quant_only": None, "gain_float_only": None, "sensitivity": None,
               "snr_quant_only_db": snr_db(r["nsr_quant_only"]),
               "snr_float_only_db": snr_db(r["nsr_float_only"]),
               # the noise this conv adds alone: the float-only direction's noise is not a
               # clean counterpart (keeping one conv float can raise the head noise of yolov5n)
               "proxy": r["nsr_quant_only"],
               "seconds": r["seconds"]}
        if not proxy_only:
            row["drop_quant_only"] = reference["float_map"] - r["map_quant_only"]
            row["gain_float_only"] = r["map_float_only"] - reference["int8_map"]
            row["sensitivity"] = row["drop_quant_only"] + row["gain_float_only"]
        rows.append(row)
    key = "proxy" if proxy_only else "sensitivity"
    # ties (frequent on a few images) go to the proxy, then to the name: a stable order
    rows.sort(key=lambda r: (-r[key], -r["proxy"], r["onnx_node"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def correlations(rows: list[dict]) -> dict:
    if rows and rows[0]["sensitivity"] is None:
        return {"proxy_vs_map": None, "quant_only": None, "float_only": None, "directions": None}
    return {
        # both directions measure the same harm: if they disagree, the mAP differences on this
        # evaluation set are mostly noise (too few images for effects this small)
        "directions": spearman([r["drop_quant_only"] for r in rows],
                               [r["gain_float_only"] for r in rows]),
        "proxy_vs_map": spearman([r["proxy"] for r in rows], [r["sensitivity"] for r in rows]),
        "quant_only": spearman([r["proxy"] for r in rows], [r["drop_quant_only"] for r in rows]),
        "float_only": spearman([r["snr_float_only_db"] for r in rows],
                               [r["gain_float_only"] for r in rows]),
    }


def trust_note(rho: dict) -> str:
    """What the correlations say about trusting the proxy (and the mAP ranking itself)."""
    proxy, directions = rho.get("proxy_vs_map"), rho.get("directions")
    if proxy is None:
        return "not measured (proxy-only run, or fewer than 3 layers)"
    if directions is not None and directions < 0.3:
        return ("inconclusive: the two mAP directions disagree, so the per-layer mAP differences "
                "are mostly noise of this evaluation set; raise analysis_max_images before "
                "judging the proxy (or the mAP ranking)")
    if proxy >= 0.8:
        return "high: the proxy ranks layers like the mAP does; analysis_proxy_only is safe here"
    if proxy >= 0.5:
        return "moderate: the proxy finds the worst layers roughly; confirm them with the mAP"
    return "low: do not rank this model by the proxy alone"

