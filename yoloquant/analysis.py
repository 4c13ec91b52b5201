"""The `analysis.py` job: which convs quantization hurts, and the smallest float fallback that
meets a target mAP.

PaddleSlim's analysis re-runs the whole PTQ and a Paddle evaluation for every layer (about a
minute per layer for yolov5n on 2 cores) and fails with onnx_format. Here Paddle calibrates
once (`ptq.calibrate`); every variant is the original ONNX graph with Q/DQ on a chosen subset
of convs (`ptq.build_qdq`), run by ONNX Runtime on evaluation images decoded once and kept in
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
from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .config import Config, require, to_dict
from .errors import ConfigError, ModelError
from .fileio import write_json
from .provenance import Timer, file_sha256, machine, package_versions
from .runtime import OnnxRuntimeBackend, default_threads
from .validator import Decoder, postprocess_settings, preprocess_for, val_dataset

log = logging.getLogger("yoloquant")

# convs are ranked with Q/DQ around the convs only (the layout every conv runs int8 in, on ONNX
# Runtime): the deployed layouts run some convs float for speed, which would hide their cost
RANK_LAYOUT = "conv_only"
CHECKPOINT = "analysis_checkpoint.json"
CALIBRATION = "analysis_calibration.json"
CALIBRATED_MODEL = "analysis_model.onnx"  # the graph the scales refer to (opset-upgraded if needed)
RANK_CSV = "sensitivity.csv"
RANK_JSON = "sensitivity.json"
RANK_TXT = "analysis.txt"
STAT_CSV = "statistic.csv"
RANK_PNG = "sensitivity_rank.png"
HIST_PNG = "hist_compare.png"
PROXY_PNG = "proxy_vs_map.png"
SKIP_YAML = "skip_tensor_list.yaml"
TARGET_DIR = "target_quant_model"
CHECKPOINT_FORMAT = 2
PARALLEL_VARIANTS = 2  # variants measured at once (the two directions of a layer)
HIST_LAYERS = 4  # layers per row of hist_compare.png (most / least sensitive)
# the config keys the measured numbers depend on (plus every PTQ key): a checkpoint is resumed
# only when they are unchanged; other keys (target, plots, paths of outputs...) may change
_FINGERPRINTED = ("arch", "dataset_dir", "train_image_dir", "train_anno_path", "val_image_dir",
                  "val_anno_path", "val_max_images", "fast_val_anno_path", "input_size",
                  "pad_mode", "pad_value", "channel_order", "pixel_scale", "conf_thres",
                  "iou_thres", "multi_label", "max_det", "skip_tensor_list",
                  "analysis_max_images", "analysis_proxy_images", "analysis_proxy_only",
                  "analysis_layers")


# ---- evaluation images, held in memory ----------------------------------------------------
@dataclass
class EvalImages:
    """The analysis evaluation set, preprocessed once."""

    tensors: list  # (3, H, W) float32 each
    infos: list
    image_ids: list
    anno_path: Path
    category_ids: list
    decoder: Decoder
    proxy_count: int  # the first images also used for the proxy
    scored_classes: np.ndarray  # model class indices with ground truth in these images

    def __len__(self) -> int:
        return len(self.tensors)


def load_eval_images(cfg: Config, input_shape) -> EvalImages:
    from .data import iterate_batches

    preprocess = preprocess_for(cfg, input_shape)
    dataset = val_dataset(cfg, preprocess, anno_path=cfg.fast_val_anno_path,
                          max_images=cfg.analysis_max_images)
    tensors, infos, ids = [], [], []
    for batch in iterate_batches(dataset, batch_size=1, workers=cfg.workers,
                                 desc="analysis images"):
        tensors.extend(batch.images)
        infos.extend(batch.infos)
        ids.extend(batch.image_ids)
    megabytes = sum(t.nbytes for t in tensors) / 2 ** 20
    if megabytes > 2048:
        log.warning("the %d analysis images take %.0f MB in memory; lower analysis_max_images if "
                    "memory runs short", len(tensors), megabytes)
    proxy = min(cfg.analysis_proxy_images, len(tensors))
    if proxy < cfg.analysis_proxy_images:
        log.warning("analysis_proxy_images is %d but the evaluation set has %d images: using %d",
                    cfg.analysis_proxy_images, len(tensors), proxy)
    decoder = Decoder(cfg.output_layout, preprocess.input_size, postprocess_settings(cfg))
    # COCOeval scores each category on its own and skips those without ground truth, so
    # detections of other classes never change the mAP; dropping them before scoring saves
    # most of pycocotools' time (multi-label NMS at conf 0.001 fills every class)
    coco = dataset.coco
    with_gt = {coco.anns[a]["category_id"] for a in coco.getAnnIds(imgIds=ids)}
    scored = np.array([i for i, c in enumerate(dataset.category_ids) if c in with_gt], dtype=np.int64)
    return EvalImages(tensors, infos, ids, dataset.anno_path, dataset.category_ids, decoder,
                      proxy, scored)


def head_tensors(model: onnx.ModelProto) -> list[str]:
    """Outputs of the convs from which a graph output is reachable through non-Conv ops only:
    the detection head's raw predictions (box and score logits) before any decoding.

    The proxy compares these rather than the decoded output, where pixel box coordinates would
    outweigh the scores.
    """
    graph = model.graph
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in set(n.input):
            readers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}
    found = []
    for conv in (n for n in graph.node if n.op_type == "Conv"):
        stack, seen = [conv.output[0]], {conv.output[0]}
        while stack:
            t = stack.pop()
            if t in outputs:
                found.append(conv.output[0])
                break
            for r in readers.get(t, []):
                if r.op_type != "Conv":
                    new = [o for o in r.output if o not in seen]
                    seen.update(new)
                    stack.extend(new)
    return found or [o.name for o in graph.output]


@dataclass
class Measurement:
    map50_95: Optional[float]  # None when only the proxy was measured
    map50: Optional[float]
    detections: Optional[int]
    heads: list  # per proxy image, the head tensors
    seconds: float


class Runner:
    """Runs ONNX variants of one model on the cached images: mAP and head outputs.

    Thread-safe: two variants may be measured at once (ONNX Runtime releases the GIL, so one
    variant's forward passes overlap the other's NMS); pycocotools runs under a lock because
    it redirects the process-wide stdout.
    """

    _coco_lock = threading.Lock()

    def __init__(self, images: EvalImages, head_names: list[str], threads: Optional[int] = None):
        self.images, self.head_names, self.threads = images, head_names, threads

    def measure(self, model: onnx.ModelProto, with_map: bool = True) -> Measurement:
        from .metrics import CocoEvaluator
        from .preprocess import boxes_to_original

        start = time.perf_counter()
        model = _with_outputs(model, self.head_names)
        backend = OnnxRuntimeBackend.from_model(model, threads=self.threads)
        batch = backend.input_shape[0]
        batch = batch if isinstance(batch, int) and batch > 1 else 1  # a fixed batch is filled
        first = backend.output_name
        count = len(self.images) if with_map else self.images.proxy_count
        heads, detections = [], []
        for i in range(count):
            x = self.images.tensors[i][None]
            if batch > 1:
                x = np.repeat(x, batch, axis=0)
            wanted = [first] + (self.head_names if i < self.images.proxy_count else [])
            outs = backend.session.run(wanted, {backend.input_name: x})
            if i < self.images.proxy_count:
                heads.append([o[:1] for o in outs[1:]])
            if with_map:
                dets = self.images.decoder(outs[0][:1])[0]
                cls = dets[:, 5].astype(np.int64)
                # out-of-range classes stay: CocoEvaluator reports a model/data mismatch
                dets = dets[np.isin(cls, self.images.scored_classes)
                            | (cls >= len(self.images.category_ids))]
                dets[:, :4] = boxes_to_original(dets[:, :4], self.images.infos[i])
                detections.append(dets)
        result = Measurement(None, None, None, heads, 0.0)
        if with_map:
            with self._coco_lock:
                evaluator = CocoEvaluator(self.images.anno_path, self.images.category_ids)
                for image_id, dets in zip(self.images.image_ids, detections):
                    evaluator.add(image_id, dets)
                stats = evaluator.summarize(self.images.image_ids)
            result.map50_95, result.map50 = float(stats["map50_95"]), float(stats["map50"])
            result.detections = int(stats["detections"])
        result.seconds = time.perf_counter() - start
        return result


class _QuietQDQ(logging.Filter):
    """Drops the QDQ writer's per-model INFO notes: a sweep builds over a hundred variants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.module != "qdq"


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` with `names` also exposed as graph outputs (a copy; the input is not changed)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output}
    for name in names:
        if name not in produced:
            raise ModelError(f"tensor {name!r} of the float model is missing from a quantized variant; "
                             "the QDQ writer renamed it (the proxy compares head outputs by name)")
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
    return out


def noise_ratio(reference: list, heads: list) -> float:
    """Noise power / signal power of `heads` against `reference` (per image, a list of head
    tensors), averaged over the head tensors: each detection scale counts the same, although
    the stride-8 one has 16x the cells of the stride-32 one."""
    ratios = []
    for k in range(len(reference[0]) if reference else 0):
        signal = noise = 0.0
        for ref_img, got_img in zip(reference, heads):
            r64 = ref_img[k].astype(np.float64)
            signal += float(np.sum(r64 * r64))
            noise += float(np.sum((got_img[k].astype(np.float64) - r64) ** 2))
        ratios.append(noise / signal if signal > 0 else 0.0)
    return float(np.mean(ratios)) if ratios else 0.0


def snr_db(nsr: Optional[float]) -> Optional[float]:
    if nsr is None:
        return None
    return 10.0 * math.log10(1.0 / nsr) if nsr > 0 else 300.0  # 300 dB: bit-identical


# ---- calibration, saved for resume --------------------------------------------------------
def _plain(value):
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _unplain(value):
    if isinstance(value, dict) and "ndarray" in value:
        return np.asarray(value["ndarray"], dtype=value["dtype"]).reshape(value["shape"])
    return value


def save_calibration(cal, path: Path) -> None:
    """The calibration's per-conv scales, exactly (JSON floats round-trip bit for bit), and the
    ONNX graph they refer to beside them (calibrate may have upgraded the file's opset)."""
    _atomic_write(path.with_name(CALIBRATED_MODEL), lambda tmp: onnx.save(cal.onnx_model, tmp))
    params = [{f.name: _plain(getattr(p, f.name)) for f in dataclasses.fields(p)}
              for p in cal.conv_params]
    write_json(path, {"algo": cal.algo, "image_dir": cal.image_dir,
                      "image_ids": [_plain(i) for i in cal.image_ids],
                      "paddle_to_onnx": cal.paddle_to_onnx, "conv_params": params})


def load_calibration(cfg: Config, path: Path):
    """A ptq.Calibration rebuilt from save_calibration's file (no Paddle model: none is needed
    to build QDQ variants)."""
    from google.protobuf.message import DecodeError

    from .ptq import Calibration
    from .qdq import ConvQuantParams

    try:
        data = json.loads(Path(path).read_text())
        params = [ConvQuantParams(**{k: _unplain(v) for k, v in p.items()})
                  for p in data["conv_params"]]
        model = onnx.load(str(Path(path).with_name(CALIBRATED_MODEL)))
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        raise ConfigError(f"cannot read the saved calibration {path} ({exc}); run analysis.py "
                          "without --resume to start over") from exc
    return Calibration(cfg, data["algo"], None, None, model, params,
                       dict(data["paddle_to_onnx"]), [], data["image_ids"], data["image_dir"],
                       Timer())


def _fingerprint(cfg: Config, model_sha: str, image_ids: list) -> dict:
    d = to_dict(cfg)
    flat = {k: d[k] for k in _FINGERPRINTED}
    flat.update({f"PTQ.{k}": v for k, v in d["PTQ"].items()})
    flat.update(model_sha256=model_sha, eval_image_ids=list(image_ids), format=CHECKPOINT_FORMAT)
    return json.loads(json.dumps(flat, default=str))  # the form it has once read back from JSON


def _fingerprint_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; a key only one side has (a PTQ option added to the code since
    the checkpoint) counts only if it is not at its default."""
    defaults = _fingerprint(Config(), "", [])
    missing = object()
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a is missing or b is missing:
            if (b if a is missing else a) != defaults.get(key, missing):
                diff.append(key)
        elif a != b:
            diff.append(key)
    return diff


# ---- statistics ---------------------------------------------------------------------------
def weight_statistics(w: np.ndarray, thresholds: np.ndarray) -> dict:
    """What makes a weight hard to quantize: outliers (abs-max/std, kurtosis), weights that
    round to zero on their channel's int8 grid, spread of channel ranges, rounding SNR."""
    w64 = w.astype(np.float64)
    flat = w64.ravel()
    std = float(flat.std())
    mean = float(flat.mean())
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    per_channel = t.size == w.shape[0] and t.size > 1
    scale = (t / 127.0).reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else t[0] / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.round(w64 / scale), -127, 127) * scale
    err = float(np.sum((q - w64) ** 2))
    ch_absmax = np.abs(w64.reshape(w.shape[0], -1)).max(axis=1)
    median = float(np.median(ch_absmax))
    central = flat - mean
    return {
        "weight_min": float(flat.min()), "weight_max": float(flat.max()),
        "weight_mean": mean, "weight_std": std,
        "weight_absmax_over_std": float(np.abs(flat).max() / std) if std > 0 else None,
        "weight_kurtosis": float(np.mean(central ** 4) / std ** 4 - 3.0) if std > 0 else None,
        "weight_zero_fraction": float(np.mean(np.abs(w64) < 0.5 * scale)),
        "weight_channel_spread": float(ch_absmax.max() / median) if median > 0 else None,
        "weight_rounding_snr_db": snr_db(err / float(np.sum(w64 ** 2))) if np.any(w64) else None,
    }


def activation_statistics(model: onnx.ModelProto, params: dict, images: EvalImages,
                          threads: Optional[int] = None) -> dict:
    """Per conv: its float input over the proxy images (range, std, share beyond the calibrated
    threshold), plus the calibrated input and output thresholds."""
    nodes = {n.name: n for n in model.graph.node}
    graph_inputs = {i.name for i in model.graph.input}
    tensors = sorted({nodes[name].input[0] for name in params} - graph_inputs)
    backend = OnnxRuntimeBackend.from_model(_with_outputs(model, tensors), threads=threads)
    # running sums per conv, so no image's activations are kept (tens of MB each)
    acc = {name: {"n": 0, "s1": 0.0, "s2": 0.0, "min": np.inf, "max": -np.inf, "clipped": 0}
           for name in params}
    for i in range(images.proxy_count):
        x = images.tensors[i][None]
        values = dict(zip(tensors, backend.session.run(tensors, {backend.input_name: x})))
        values.update(dict.fromkeys(graph_inputs, x))
        for name, p in params.items():
            a = values[nodes[name].input[0]].astype(np.float64).ravel()
            s = acc[name]
            s["n"] += a.size
            s["s1"] += float(a.sum())
            s["s2"] += float(np.dot(a, a))
            s["min"] = min(s["min"], float(a.min()))
            s["max"] = max(s["max"], float(a.max()))
            s["clipped"] += int(np.count_nonzero(np.abs(a) > p.input_threshold))
    out = {}
    for name, p in params.items():
        s = acc[name]
        mean = s["s1"] / s["n"]
        std = math.sqrt(max(s["s2"] / s["n"] - mean * mean, 0.0))
        absmax = max(abs(s["min"]), abs(s["max"]))
        out[name] = {
            "act_min": s["min"], "act_max": s["max"], "act_std": std,
            "act_absmax_over_std": absmax / std if std > 0 else None,
            "act_threshold": float(p.input_threshold),
            "act_clipped_fraction": s["clipped"] / s["n"],
            "out_threshold": None if p.output_threshold is None else float(p.output_threshold),
        }
    return out


def layer_statistics(cal, layers: list[str], images: EvalImages,
                     threads: Optional[int] = None) -> dict:
    inits = {i.name: i for i in cal.onnx_model.graph.initializer}
    nodes = {n.name: n for n in cal.onnx_model.graph.node}
    params = {p.node_name: p for p in cal.conv_params if p.node_name in set(layers)}
    acts = activation_statistics(cal.onnx_model, params, images, threads)
    stats = {}
    for name in layers:
        w = numpy_helper.to_array(inits[nodes[name].input[1]])
        stats[name] = {"weight_shape": "x".join(map(str, w.shape)),
                       **weight_statistics(w, params[name].weight_thresholds), **acts[name]}
    return stats


# ---- ranking ------------------------------------------------------------------------------
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


# ---- outputs ------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Let write(tmp_path) produce the file, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary result files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else
                             (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                         for k in columns})
    _write_text(path, buf.getvalue())


RANK_COLUMNS = ["rank", "paddle_weight", "onnx_node", "sensitivity", "map_quant_only",
                "drop_quant_only", "map_float_only", "gain_float_only", "proxy",
                "snr_quant_only_db", "snr_float_only_db", "seconds"]
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


def format_report(rows: list[dict], reference: dict, rho: dict, meta: dict,
                  target: Optional[dict]) -> str:
    proxy_only = bool(rows) and rows[0]["sensitivity"] is None
    lines = [
        "Quantization sensitivity per conv (yoloquant analysis.py)",
        "",
        f"model:        {meta['model']}",
        f"evaluation:   {meta['eval_images']} images of {meta['anno_path']} (mAP@0.5:0.95)",
        f"calibration:  {meta['algo']} on {meta['calib_images']} images, computed once",
        f"float:        mAP {reference['float_map']:.4f}",
        f"all int8:     mAP {reference['int8_map']:.4f} "
        f"({_pt(reference['int8_map'] - reference['float_map'])} points), "
        f"head SNR {snr_db(reference['int8_nsr']):.1f} dB",
        "",
        "quant-only: only this conv quantized (drop vs float); float-only: every conv quantized "
        "but this one (gain vs all int8).",
        "sensitivity = drop + gain, in mAP points; SNR: raw head outputs vs float on "
        f"{meta['proxy_images']} images (noise averaged over the head's scales);",
        "proxy = the head noise this conv adds alone (the q-only SNR, as a power ratio).",
    ]
    if proxy_only:
        lines.append("analysis_proxy_only: ranked by the proxy (no per-layer mAP).")
    else:
        lines.append(f"Spearman(quant-only drop, float-only gain) = {_fmt(rho['directions'])} "
                     "(the two mAP directions agree when high; near 0: noise)")
        lines.append(f"Spearman(proxy, sensitivity) = {_fmt(rho['proxy_vs_map'])} (proxy vs "
                     f"quant-only drop {_fmt(rho['quant_only'])}; float-only SNR vs gain "
                     f"{_fmt(rho['float_only'])})")
        lines.append(f"  -> {trust_note(rho)}")
    lines += ["", f"{'rank':>4}  {'paddle weight':<16} {'onnx conv':<28} {'sens.':>6} "
              f"{'q-only mAP':>10} {'drop':>6} {'f-only mAP':>10} {'gain':>6} "
              f"{'q-only SNR':>10} {'f-only SNR':>10}"]
    for r in rows:
        q = "-" if r["map_quant_only"] is None else f"{r['map_quant_only']:.4f}"
        f = "-" if r["map_float_only"] is None else f"{r['map_float_only']:.4f}"
        lines.append(
            f"{r['rank']:>4}  {r['paddle_weight']:<16} {_short(r['onnx_node'])[:28]:<28} "
            f"{_pt(r['sensitivity']):>6} {q:>10} {_pt(r['drop_quant_only']):>6} {f:>10} "
            f"{_pt(r['gain_float_only']):>6} {_db(r['snr_quant_only_db'])} "
            f"{_db(r['snr_float_only_db'])}")
    if target:
        lines += ["", f"target_metric {target['target']:.4f}: keep {len(target['float_layers'])} "
                  f"conv(s) float -> mAP {target['confirmed_map']:.4f} measured on the saved "
                  f"{TARGET_DIR}/model_int8.onnx ({target['full_evaluations']} evaluations, "
                  f"{target['seconds']:.0f} s)",
                  f"skip_tensor_list: {json.dumps(target['skip_tensor_list'])}"]
    return "\n".join(lines) + "\n"


def _db(v: Optional[float]) -> str:
    return f"{'-':>10}" if v is None else f"{v:>7.1f} dB"


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def plot_rank(rows: list[dict], reference: dict, meta: dict, path: Path) -> None:
    """Horizontal bars, most sensitive conv at the top: both directions, in mAP points."""
    from matplotlib.figure import Figure

    n = len(rows)
    proxy_only = bool(rows) and rows[0]["sensitivity"] is None
    fig = Figure(figsize=(10, 1.6 + 0.24 * n))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(n)
    labels = [f"{r['paddle_weight']}  {_short(r['onnx_node'])}" for r in rows]
    if proxy_only:
        ax.barh(y, [r["snr_quant_only_db"] for r in rows], color="tab:purple",
                label="head SNR with only this conv int8 (lower: more sensitive)")
        ax.set_xlabel("SNR of the head outputs against float (dB)")
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
            score = (f"{_pt(row['sensitivity'])} pt" if row["sensitivity"] is not None
                     else f"{row['snr_quant_only_db']:.1f} dB")
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
    ax.scatter([r["snr_quant_only_db"] for r in rows], [100 * r["sensitivity"] for r in rows],
               s=14)
    ax.invert_xaxis()  # low SNR (a noisier conv) to the right, like a high sensitivity
    ax.set_xlabel("proxy: head SNR with only this conv int8 (dB)")
    ax.set_ylabel("sensitivity (mAP points)")
    ax.set_title(f"proxy vs mAP: Spearman {_fmt(rho['proxy_vs_map'])}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


# ---- the target search --------------------------------------------------------------------
def search_prefix(evaluate: Callable[[int], float], n: int, target: float,
                  known: dict) -> tuple[int, dict]:
    """Smallest k in 0..n with evaluate(k) >= target, by bisection over the ranking's prefixes.

    Assumes keeping more of the most sensitive convs float does not lower the mAP (roughly
    true; the final model is measured again). known: k -> mAP already measured (0 and n).
    """
    scores = dict(known)

    def score(k):
        if k not in scores:
            scores[k] = evaluate(k)
        return scores[k]

    if score(0) >= target:
        return 0, scores
    lo, hi = 0, n  # score(lo) < target <= score(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if score(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi, scores


# ---- the job ------------------------------------------------------------------------------
@dataclass
class AnalysisResult:
    save_dir: Path
    complete: bool
    rows: list = field(default_factory=list)
    reference: dict = field(default_factory=dict)
    spearman: dict = field(default_factory=dict)
    target: Optional[dict] = None
    seconds: dict = field(default_factory=dict)


def _resolve_layers(cfg: Config, cal) -> list[str]:
    order = [p.node_name for p in cal.conv_params]
    if not cfg.analysis_layers:
        return order
    to_onnx = cal.paddle_to_onnx
    chosen, known = set(), order + list(to_onnx)
    for name in cfg.analysis_layers:
        node = to_onnx.get(name, name)
        if node not in order:
            if name in (cfg.skip_tensor_list or []):
                raise ConfigError(f"analysis_layers names {name!r}, which skip_tensor_list keeps "
                                  "float: remove it from one of the two lists")
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(order[:3])}"
            raise ConfigError(f"analysis_layers names {name!r}, which is not a quantized conv of "
                              f"this model ({hint})")
        chosen.add(node)
    return [n for n in order if n in chosen]


TARGET_MISSING = ("get_target_quant_model is true but target_metric is null: set the "
                  "mAP@0.5:0.95 the model must reach (e.g. the float mAP minus 0.005)")


def _check_target(cfg: Config, float_map: float, images: int) -> None:
    if not cfg.get_target_quant_model:
        return
    if cfg.target_metric is None:
        raise ConfigError(TARGET_MISSING)
    if cfg.target_metric > float_map:
        raise ConfigError(f"target_metric {cfg.target_metric:.4f} is above the float model's "
                          f"mAP@0.5:0.95 {float_map:.4f} on the {images} analysis images: no "
                          f"quantized model can reach it. Set target_metric to at most "
                          f"{float_map:.4f} (e.g. {max(float_map - 0.005, 0.0):.4f}, half a point "
                          "below float)")


def run_analysis(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
                 progress: bool = True, threads: Optional[int] = None) -> AnalysisResult:
    """Rank the convs by sensitivity; write the outputs into cfg.save_dir; optionally search the
    target model.

    stop_after: analyse at most this many layers in this call, then return an incomplete result
    (a checkpointed stop, as after a kill; `resume=True` continues).
    """
    from .ptq import build_qdq, calibrate

    require(cfg, "model_dir", "save_dir")
    if cfg.get_target_quant_model and cfg.target_metric is None:  # fail now, not after the sweep
        raise ConfigError(TARGET_MISSING)
    timer = Timer()
    started = time.perf_counter()
    save = Path(cfg.save_dir)
    try:
        save.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"save_dir {save} is not writable: {exc}") from exc
    probe = OnnxRuntimeBackend(cfg.model_dir, threads=threads)
    with timer("load_images"):
        images = load_eval_images(cfg, probe.input_shape)
    fingerprint = _fingerprint(cfg, file_sha256(cfg.model_dir), images.image_ids)

    checkpoint = None
    if resume and (save / CHECKPOINT).is_file():
        try:
            checkpoint = json.loads((save / CHECKPOINT).read_text())
        except ValueError as exc:
            raise ConfigError(f"{save / CHECKPOINT} is not valid JSON ({exc}); run without --resume "
                              "to start over") from exc
        diff = _fingerprint_diff(checkpoint.get("fingerprint", {}), fingerprint)
        if diff:
            raise ConfigError(f"the checkpoint in {save} was made with a different model, data or "
                              f"config (differs: {', '.join(diff)}); run without --resume to start "
                              "over, or use another save_dir")
        cal = load_calibration(cfg, save / CALIBRATION)
        log.info("resuming: %d of %d layers already analysed in %s", len(checkpoint["results"]),
                 len(checkpoint["layers"]), save / CHECKPOINT)
    else:
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting from the beginning", save)
        elif (save / CHECKPOINT).is_file():
            log.info("starting over (pass --resume to continue the checkpoint in %s)", save)
        with tempfile.TemporaryDirectory(prefix="yoloquant-analysis-") as work, timer("calibrate"):
            # once: every variant below reuses these scales. post_quant's automatic float
            # choices are off: this tool measures every conv and makes that choice itself.
            cal = calibrate(dataclasses.replace(cfg, min_layer_snr_db=None,
                                                keep_regression_float=False), work)
        save_calibration(cal, save / CALIBRATION)

    heads = head_tensors(cal.onnx_model)
    # two variants at a time, each on half the cores: forward passes overlap NMS and COCOeval
    cores = threads or default_threads()
    runner = Runner(images, heads, max(1, cores // PARALLEL_VARIANTS))
    solo = Runner(images, heads, cores)  # one measurement at a time (ORT: same numbers)
    float_run = solo.measure(cal.onnx_model, with_map=checkpoint is None)
    if checkpoint is None:
        with timer("reference"):
            int8_run = solo.measure(build_qdq(cal, backend=RANK_LAYOUT), with_map=True)
        reference = {"float_map": float_run.map50_95, "float_map50": float_run.map50,
                     "int8_map": int8_run.map50_95, "int8_map50": int8_run.map50,
                     "int8_nsr": noise_ratio(float_run.heads, int8_run.heads)}
        layers = _resolve_layers(cfg, cal)
        checkpoint = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint,
                      "reference": reference, "layers": layers, "results": {},
                      "calibration": CALIBRATION}
        write_json(save / CHECKPOINT, checkpoint)
    reference, layers = checkpoint["reference"], checkpoint["layers"]
    log.info("float mAP %.4f, all-int8 mAP %.4f on %d images; %d convs to analyse",
             reference["float_map"], reference["int8_map"], len(images), len(layers))
    _check_target(cfg, reference["float_map"], len(images))

    quiet = _QuietQDQ()
    log.addFilter(quiet)
    try:
        return _sweep_and_report(cfg, cal, images, runner, solo, float_run, checkpoint, timer,
                                 started, stop_after, progress, threads)
    finally:
        log.removeFilter(quiet)


def _sweep_and_report(cfg, cal, images, runner, solo, float_run, checkpoint, timer, started,
                      stop_after, progress, threads) -> AnalysisResult:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .ptq import build_qdq

    save = Path(cfg.save_dir)
    reference, layers, results = checkpoint["reference"], checkpoint["layers"], checkpoint["results"]
    all_nodes = [p.node_name for p in cal.conv_params]
    with_map = not cfg.analysis_proxy_only
    todo = [n for n in layers if n not in results]
    if stop_after is not None:
        todo = todo[:stop_after]
    names = cal.onnx_to_paddle()
    sweep_start = time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(layers), initial=len(results),
                                       desc="sensitivity", unit="layer",
                                       disable=None if progress else True) as bar, \
            ThreadPoolExecutor(PARALLEL_VARIANTS, thread_name_prefix="yoloquant-variant") as pool:
        for count, node in enumerate(todo, 1):
            t0 = time.perf_counter()
            models = [build_qdq(cal, [n for n in all_nodes if n != node], backend=RANK_LAYOUT)]
            if with_map:  # the proxy needs the quant-only direction alone
                models.append(build_qdq(cal, [node], backend=RANK_LAYOUT))
            runs = list(pool.map(lambda m: runner.measure(m, with_map), models))
            only, but = runs[0], runs[-1] if with_map else None
            results[node] = {"map_quant_only": only.map50_95,
                             "map_float_only": but.map50_95 if but else None,
                             "nsr_quant_only": noise_ratio(float_run.heads, only.heads),
                             "nsr_float_only": noise_ratio(float_run.heads, but.heads) if but else None,
                             "seconds": round(time.perf_counter() - t0, 2)}
            write_json(save / CHECKPOINT, checkpoint)  # after every layer: a kill loses one
            bar.update(1)
            done = len(results)
            per = (time.perf_counter() - sweep_start) / count
            r = results[node]
            log.info("[%d/%d] %s (%s): %s; ETA %.0f s", done, len(layers), names.get(node, "?"),
                     _short(node),
                     (f"mAP {_pt(r['map_quant_only'] - reference['float_map'])} pt vs float "
                      f"with it alone int8, {_pt(r['map_float_only'] - reference['int8_map'])} pt "
                      "vs all-int8 with it alone float, " if with_map else "")
                     + f"head SNR {snr_db(r['nsr_quant_only']):.1f} dB int8 alone",
                     per * (len(layers) - done))
    timer.seconds["sweep"] = round(time.perf_counter() - sweep_start, 2)
    if len(results) < len(layers):
        log.info("stopped after %d of %d layers; run again with --resume to continue",
                 len(results), len(layers))
        return AnalysisResult(save, False, reference=reference, seconds=timer.seconds)

    rows = rank_layers(results, layers, reference, names, cfg.analysis_proxy_only)
    rho = correlations(rows)
    with timer("statistics"):
        stats = layer_statistics(cal, layers, images, threads)
    meta = {"model": cfg.model_dir, "model_name": Path(cfg.model_dir).name,
            "eval_images": len(images), "anno_path": str(images.anno_path),
            "proxy_images": images.proxy_count, "algo": cal.algo,
            "calib_images": len(cal.image_ids)}
    result = AnalysisResult(save, True, rows, reference, rho, seconds=timer.seconds)
    with timer("outputs"):
        _write_outputs(cfg, cal, result, stats, meta, None)
    if cfg.get_target_quant_model:
        result.target = find_target_model(cfg, cal, solo, rows, reference, timer)
        _write_outputs(cfg, cal, result, stats, meta, result.target)
    timer.seconds["total"] = round(time.perf_counter() - started, 2)
    _write_outputs(cfg, cal, result, stats, meta, result.target, figures=False)
    return result


def _write_outputs(cfg, cal, result: AnalysisResult, stats: dict, meta: dict,
                   target: Optional[dict], figures: bool = True) -> None:
    save, rows = result.save_dir, result.rows
    _write_csv(save / RANK_CSV, rows, RANK_COLUMNS)
    stat_rows = [{**stats[r["onnx_node"]], "rank": r["rank"], "paddle_weight": r["paddle_weight"],
                  "onnx_node": r["onnx_node"]} for r in rows]
    _write_csv(save / STAT_CSV, stat_rows, STAT_COLUMNS)
    write_json(save / RANK_JSON, {
        "meta": meta, "reference": result.reference, "spearman": result.spearman,
        "spearman_note": trust_note(result.spearman),
        "layers": [{**r, "statistics": stats[r["onnx_node"]]} for r in rows],
        "target": target, "seconds": result.seconds,
        "versions": package_versions(), "machine": machine()})
    _write_text(save / RANK_TXT, format_report(rows, result.reference, result.spearman, meta,
                                               target))
    if figures:
        plot_rank(rows, result.reference, meta, save / RANK_PNG)
        if cfg.plot_hist:
            plot_hist(rows, stats, cal, save / HIST_PNG)
        if rows and rows[0]["sensitivity"] is not None:
            plot_proxy(rows, result.spearman, save / PROXY_PNG)


def find_target_model(cfg: Config, cal, runner: Runner, rows: list[dict], reference: dict,
                      timer: Timer) -> dict:
    """Smallest prefix of the ranking kept float that meets target_metric, saved like
    post_quant.py (Paddle int8 model + QDQ ONNX + summary.json) with its skip list."""
    from .ptq import QDQ_ONNX, SUMMARY, build_qdq, quantize

    start = time.perf_counter()
    target = cfg.target_metric
    order = [r["onnx_node"] for r in rows]
    all_nodes = {p.node_name for p in cal.conv_params}
    known = {0: reference["int8_map"]}
    if set(order) == all_nodes:
        known[len(order)] = reference["float_map"]  # every conv float: the float model itself

    evaluations = []

    def evaluate(k: int) -> float:
        m = runner.measure(build_qdq(cal, order[:k], backend=RANK_LAYOUT), with_map=True).map50_95
        evaluations.append(k)
        log.info("target search: %d most sensitive conv(s) float -> mAP %.4f (target %.4f)",
                 k, m, target)
        return m

    n = len(order)
    # all-int8 already meeting the target ends the search before anything is kept float
    if known[0] < target and n not in known:
        known[n] = evaluate(n)
    if known[0] < target and known[n] < target:
        raise ConfigError(f"even with all {n} analysed convs float the mAP is {known[n]:.4f}, below "
                          f"target_metric {target:.4f}: widen analysis_layers (null: every conv) or "
                          "lower target_metric")
    k, scores = search_prefix(evaluate, n, target, known)
    names = cal.onnx_to_paddle()
    out_dir = Path(cfg.save_dir) / TARGET_DIR
    user_skip = list(cfg.skip_tensor_list or [])
    while True:
        skip = user_skip + [names[node] for node in order[:k]]
        with timer("target_quantize"):
            # the automatic float choices stay off, as in the sweep: the saved model is the
            # one the search measured
            saved = quantize(dataclasses.replace(cfg, skip_tensor_list=skip or None,
                                                 min_layer_snr_db=None, keep_regression_float=False),
                             out_dir, algo=cal.algo)
        confirmed = runner.measure(onnx.load(str(out_dir / QDQ_ONNX)), with_map=True)
        evaluations.append("saved")
        if confirmed.map50_95 >= target or k >= n:
            break
        # the saved model lands below the bisection's: keep one more conv float
        log.warning("the saved model measures %.4f < target %.4f: keeping one more conv float",
                    confirmed.map50_95, target)
        k += 1
    found = {"target": target, "float_layers": order[:k], "skip_tensor_list": skip,
             "searched_map": scores.get(k), "confirmed_map": confirmed.map50_95,
             "confirmed_map50": confirmed.map50, "met": confirmed.map50_95 >= target,
             "evaluations": {str(key): v for key, v in sorted(scores.items())},
             "full_evaluations": len(evaluations),
             "save_dir": str(out_dir), "seconds": round(time.perf_counter() - start, 2)}
    saved.summary["analysis"] = {
        "target_metric": target, "eval_images": len(runner.images),
        "eval_anno_path": str(runner.images.anno_path), "float_map": reference["float_map"],
        "int8_map": reference["int8_map"], "map": confirmed.map50_95,
        "float_layers": found["float_layers"]}
    write_json(out_dir / SUMMARY, saved.summary)
    snippet = (f"# analysis.py: the fewest convs kept float for mAP@0.5:0.95 >= {target:.4f} on "
               f"{len(runner.images)} images of {runner.images.anno_path.name}\n"
               f"# measured {confirmed.map50_95:.4f} (float {reference['float_map']:.4f}, all int8 "
               f"{reference['int8_map']:.4f}); paste into a post_quant.py config:\n"
               f"skip_tensor_list: {json.dumps(skip)}\n"
               "# the convs analysis.py measured were chosen with the automatic float choices off:\n"
               "min_layer_snr_db: null\nkeep_regression_float: false\n")
    _write_text(Path(cfg.save_dir) / SKIP_YAML, snippet)
    if not found["met"]:
        log.warning("no model met target_metric %.4f; the saved one keeps every analysed conv "
                    "float", target)
    timer.seconds["target_search"] = found["seconds"]
    return found


def analysis_command(config_path: str, device: str = "cpu", resume: bool = False) -> AnalysisResult:
    from .cli import load_job_config

    root = logging.getLogger()
    level = root.level
    import paddle  # noqa: F401 - importing paddle sets the root logger to WARNING: undo that,
    root.setLevel(level)  # or the per-layer progress lines of a long run are never shown
    cfg = load_job_config(config_path, device)
    result = run_analysis(cfg, resume=resume)
    save = result.save_dir
    print((save / RANK_TXT).read_text())
    if result.target:
        print((save / SKIP_YAML).read_text())
    print(f"outputs in {save}: {RANK_TXT}, {RANK_CSV}, {RANK_JSON}, {STAT_CSV}, {RANK_PNG}"
          + (f", {HIST_PNG}" if cfg.plot_hist else "")
          + (f", {PROXY_PNG}" if not cfg.analysis_proxy_only else "")
          + (f", {SKIP_YAML}, {TARGET_DIR}/" if result.target else ""))
    return result
