"""Ranking the convs by sensitivity, and how far the measures agree (Spearman)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..stats import snr_db


def spearman(a: list, b: list) -> Optional[float]:
    """Spearman rank correlation (ties get their average rank); None when undefined."""
    from scipy.stats import rankdata

    if len(a) < 3:
        return None
    ra, rb = rankdata(a), rankdata(b)
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _shares(r: dict, int8_nsr: float, half: Optional[int] = None) -> tuple:
    """(noise this conv adds alone, noise removed when it alone stays float), each as a share
    of the all-int8 model's head noise; from the half `half` of the images if given."""
    def value(key, ref):
        if r.get(key) is None:
            return None
        v = r[key] if half is None else r[key + "_halves"][half]
        return v / ref if ref > 0 else 0.0

    ref = int8_nsr
    alone = value("nsr_quant_only", ref)
    removed = None if r.get("nsr_float_only") is None else 1.0 - value("nsr_float_only", ref)
    return alone, removed


def _map_key(r: dict, reference: dict, half: Optional[int] = None) -> Optional[float]:
    if r.get("map_quant_only") is None or r.get("map_float_only") is None:
        return None
    pick = (lambda key: r[key]) if half is None else (lambda key: r[key + "_halves"][half])
    ref = (lambda key: reference[key]) if half is None else (lambda key: reference[key + "_halves"][half])
    return (ref("float_map") - pick("map_quant_only")) + (pick("map_float_only") - ref("int8_map"))


def sensitivity_of(r: dict, reference: dict, metric: str, proxy_only: bool,
                   half: Optional[int] = None) -> Optional[float]:
    """The ranking key of one conv (on all images, or on the half `half`).

    noise: the share of the all-int8 head noise this conv accounts for, alone int8 plus removed
    when it alone stays float (about 2 x its share if the convs' noise adds up); proxy_only: the
    first part. map: the mAP drop with it alone int8 plus the gain with it alone float."""
    int8 = reference["int8_nsr"] if half is None else reference["int8_nsr_halves"][half]
    alone, removed = _shares(r, int8, half)
    if metric == "noise" or proxy_only:
        return alone if proxy_only else alone + removed
    return _map_key(r, reference, half)


def rank_layers(results: dict, layers: list[str], reference: dict, onnx_to_paddle: dict,
                metric: str, proxy_only: bool) -> list[dict]:
    """One row per layer, most sensitive first."""
    rows = []
    for node in layers:
        r = results[node]
        alone, removed = _shares(r, reference["int8_nsr"])
        row = {"paddle_weight": onnx_to_paddle.get(node, ""), "onnx_node": node,
               "map_quant_only": r["map_quant_only"], "map_float_only": r["map_float_only"],
               "drop_quant_only": None, "gain_float_only": None,
               "noise_alone": alone, "noise_removed": removed,
               "sensitivity": sensitivity_of(r, reference, metric, proxy_only),
               "sensitivity_halves": [sensitivity_of(r, reference, metric, proxy_only, h)
                                      for h in (0, 1)],
               "snr_quant_only_db": snr_db(r["nsr_quant_only"]),
               "snr_float_only_db": snr_db(r["nsr_float_only"]),
               # the noise this conv adds alone: the float-only direction's noise is not a
               # clean counterpart (keeping one conv float can raise the head noise of yolov5n)
               "proxy": r["nsr_quant_only"],
               "seconds": r["seconds"]}
        if r["map_quant_only"] is not None:
            row["drop_quant_only"] = reference["float_map"] - r["map_quant_only"]
        if r["map_float_only"] is not None:
            row["gain_float_only"] = r["map_float_only"] - reference["int8_map"]
        rows.append(row)
    # ties go to the proxy, then to the name: a stable order
    rows.sort(key=lambda r: (-r["sensitivity"], -r["proxy"], r["onnx_node"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def correlations(rows: list[dict]) -> dict:
    """Spearman correlations: split_half (the ranking key on one half of the images against
    the other: is the ranking reproducible?), directions (the two ways a conv is measured, in
    the ranking's metric), proxy_vs_map and the others where per-conv mAP was measured."""
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    have = lambda key: bool(rows) and all(r[key] is not None for r in rows)  # noqa: E731
    out = {"split_half": spearman([r["sensitivity_halves"][0] for r in rows],
                                  [r["sensitivity_halves"][1] for r in rows])
           if rows and all(None not in r["sensitivity_halves"] for r in rows) else None,
           "directions": None, "proxy_vs_map": None, "quant_only": None, "float_only": None}
    if have("drop_quant_only") and have("gain_float_only"):
        # both directions measure the same harm: if they disagree, the mAP differences on this
        # evaluation set are mostly noise (too few images for effects this small)
        out["directions"] = spearman(col("drop_quant_only"), col("gain_float_only"))
        maps = [a + b for a, b in zip(col("drop_quant_only"), col("gain_float_only"))]
        out["proxy_vs_map"] = spearman(col("proxy"), maps)
        out["quant_only"] = spearman(col("proxy"), col("drop_quant_only"))
        out["float_only"] = spearman(col("snr_float_only_db"), col("gain_float_only"))
    elif have("noise_alone") and have("noise_removed"):
        out["directions"] = spearman(col("noise_alone"), col("noise_removed"))
    return out


SPLIT_HALF_OK = 0.7  # the ranking made on one half of the images should agree with the other's


def trust_note(rho: dict) -> str:
    """What the correlations say about trusting the ranking."""
    split = rho.get("split_half")
    if split is None:
        return "not measured (fewer than 3 layers)"
    if split >= SPLIT_HALF_OK:
        return (f"reproducible: the rankings made on the two halves of the images agree "
                f"(Spearman {split:.2f} >= {SPLIT_HALF_OK})")
    return (f"not reproducible on these images (split-half Spearman {split:.2f} < {SPLIT_HALF_OK}): "
            "the differences between convs are within the noise of the image set; raise "
            "analysis_max_images (or use analysis_metric: noise)")
