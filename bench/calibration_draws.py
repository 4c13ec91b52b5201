"""Benchmark: how much the deployed INT8 mAP depends on which images calibrate it.

  python bench/calibration_draws.py --config_path configs/yolov5n_coco_mini.yaml --algos avg abs_max

Splits the calibration folder (sorted by file name) into disjoint draws of PTQ.batch_nums x
batch_size images, runs the whole post_quant job on each and scores both INT8 artifacts on the
evaluation set. The spread across draws is the noise any single-run comparison carries; the
mean is what a user should expect. Prints a Markdown table and writes it with a JSON copy to --out.
With --ray_address every draw is one Ray task (yoloquant.distributed; the calibration images,
model and evaluation set must be at the same paths on every node).
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.errors import YoloQuantError  # noqa: E402
from yoloquant.config import PTQ_ALGOS, WEIGHT_ROUNDINGS, load_config  # noqa: E402
from yoloquant.data import IMAGE_EXTENSIONS  # noqa: E402
from yoloquant.distributed import add_ray_flags, check_flags  # noqa: E402
from yoloquant.evaluate import evaluate_backend, evaluate_saved  # noqa: E402
from yoloquant.fileio import write_json  # noqa: E402
from yoloquant.provenance import machine, machine_line, package_versions  # noqa: E402
from yoloquant.ptq import quantize  # noqa: E402
from yoloquant.runtime import OnnxRuntimeBackend  # noqa: E402
from yoloquant.stats import CI_NOTE, paired_delta, resample_weights  # noqa: E402

OPENVINO = "QDQ ONNX on OpenVINO"
# every int8 runtime evaluate_saved scores a saved model on (OpenVINO when installed)
RUNTIMES = {"paddle-inference(onednn-int8)": "Paddle int8", "onnxruntime": "QDQ ONNX",
            "openvino": OPENVINO}


def nncf_row(cfg, xml: Path, draw: int, first_image: str) -> dict:
    """NNCF on the draw's calibration images (the same images, preprocessed the same way)."""
    from bench.speed import OpenVinoBackend, calibration_images, quantize_nncf_openvino

    images, _, _ = calibration_images(cfg, cfg.model_dir)
    quantize_nncf_openvino(cfg.model_dir, images, xml)
    result = evaluate_backend(cfg, OpenVinoBackend(xml, threads=2))
    return {"draw": draw, "first_image": first_image, "algo": "NNCF", "OpenVINO": result}


def draw_rows(d: int, cfg, files: list, size: int, algos: list, peers: list, openvino: bool,
              threads=None) -> list:
    """Every row of draw d: each algorithm's post_quant job and scores (and NNCF's)."""
    if threads:  # a Ray task: the threads its CPUs were reserved for
        os.environ["YOLOQUANT_THREADS"] = str(threads)
    cfg = copy.deepcopy(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"draw{d}"
        folder.mkdir()
        for f in files[d * size:(d + 1) * size]:
            os.symlink(f.resolve(), folder / f.name)  # f may be relative to the cwd
        cfg.train_image_dir, cfg.train_anno_path = str(folder), None
        if "nncf" in peers:
            rows.append(nncf_row(cfg, Path(tmp) / f"nncf_{d}.xml", d, files[d * size].name))
            print({k: getattr(v, 'map50_95', v) for k, v in rows[-1].items()}, flush=True)
        for algo in algos:
            cfg.PTQ.algo = algo
            save = Path(tmp) / f"out_{d}_{algo}"
            result = quantize(cfg, save)
            scores = {RUNTIMES[r.runtime]: r for r in evaluate_saved(cfg, str(save))}
            if not openvino:  # evaluate_saved scores OpenVINO whenever it is installed
                scores.pop(OPENVINO, None)
            rows.append({"draw": d, "first_image": files[d * size].name, "algo": algo,
                         "float_convs": len(result.summary["kept_float"]["conv_reasons"]),
                         **scores})
            print({k: getattr(v, 'map50_95', v) for k, v in rows[-1].items()}, flush=True)
    return rows


def all_draws(args, cfg, files: list, size: int, draws: int) -> tuple[list, dict]:
    """The rows of every draw, in draw order, and the cluster they ran on (or None)."""
    if args.ray_address is None:
        job = (cfg, files, size, args.algos, args.peers, args.openvino)
        return [row for d in range(draws) for row in draw_rows(d, *job)], None
    from yoloquant.distributed import connect, run_tasks

    # absolute paths: a worker on another node does not start in this directory
    cfg = copy.deepcopy(cfg)
    cfg.model_dir, cfg.dataset_dir = str(Path(cfg.model_dir).resolve()), str(Path(cfg.dataset_dir).resolve())
    job = (cfg, [f.resolve() for f in files], size, args.algos, args.peers, args.openvino)

    with connect(args.ray_address, args.ray_workers, args.ray_threads) as cluster:
        found = dict(run_tasks(cluster, draw_rows, range(draws), *job, cluster.threads,
                               desc="calibration draws", unit="draws"))
        return [row for d in range(draws) for row in found[d]], cluster.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/yolov5n_coco_mini.yaml")
    parser.add_argument("--algos", nargs="*", default=["avg"], choices=PTQ_ALGOS,
                        help="our algorithms to run (none: only --peers)")
    parser.add_argument("--draws", type=int, default=5, help="at most this many disjoint draws")
    parser.add_argument("--weight_rounding", choices=WEIGHT_ROUNDINGS, default=None)
    parser.add_argument("--peers", nargs="*", default=[], choices=["nncf"],
                        help="also quantize each draw with NNCF (OpenVINO model, head ignored, as "
                             "in bench/speed.py) and score it on OpenVINO")
    parser.add_argument("--openvino", action="store_true",
                        help="also score our QDQ ONNX on OpenVINO's CPU plugin")
    parser.add_argument("--out", default="bench/results")
    add_ray_flags(parser)
    args = parser.parse_args()
    setup_logging()
    try:
        check_flags(args.ray_address, args.ray_workers, args.ray_threads)
    except YoloQuantError as exc:
        sys.exit(f"error: {exc}")
    cfg = load_config(args.config_path)
    if args.weight_rounding:
        cfg.weight_rounding = args.weight_rounding
    size = cfg.PTQ.batch_nums * cfg.PTQ.batch_size
    source = Path(cfg.data_path(cfg.train_image_dir))
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    draws = min(args.draws, len(files) // size)
    if draws < 2:
        sys.exit(f"{source} has {len(files)} images: fewer than two draws of {size}")
    fp32_result = evaluate_backend(cfg, OnnxRuntimeBackend(cfg.model_dir))
    fp32 = fp32_result.map50_95
    # each runtime's value: its validator.EvalResult (plain numbers in the JSON)
    try:
        rows, cluster = all_draws(args, cfg, files, size, draws)
    except YoloQuantError as exc:
        sys.exit(f"error: {exc}")
    where = f"{source.parent.name}/{source.name}"
    lines = [f"FP32 {fp32:.4f}; {draws} disjoint draws of {size} images from {where} "
             f"(sorted by name); weight rounding: {cfg.weight_rounding}; mAP@0.5:0.95 on the "
             f"evaluation set, (delta to FP32 in points [{CI_NOTE}]; mean: the draws' mean mAP, "
             "its interval from the same resamples)", machine_line(), "",
             "| algo | runtime | " + " | ".join(f"draw {d}" for d in range(draws)) + " | mean | std |",
             "|---|---|" + "---|" * draws + "---|---|"]
    runtimes = list(RUNTIMES.values()) + ([OPENVINO] if args.openvino else [])
    cells_of = [(algo, runtime) for algo in args.algos for runtime in runtimes]
    if "nncf" in args.peers:
        cells_of.append(("NNCF", "OpenVINO"))
    weights = resample_weights(fp32_result.images)
    for algo, runtime in cells_of:
        results = [r[runtime] for r in rows if r["algo"] == algo]
        deltas = [paired_delta(fp32_result.matches, r.matches, weights=weights) for r in results]
        mean_delta = paired_delta(fp32_result.matches, [r.matches for r in results], weights=weights)
        cells = " | ".join(f"{r.map50_95:.4f} ({d.map50_95.points()})" for r, d in zip(results, deltas))
        values = [r.map50_95 for r in results]
        lines.append(f"| {algo} | {runtime} | {cells} | {statistics.mean(values):.4f} "
                     f"({mean_delta.map50_95.points()}) | {statistics.stdev(values) * 100:.2f} |")
        for r, d in zip([r for r in rows if r["algo"] == algo], deltas):
            r[runtime] = {"map50_95": r[runtime].map50_95, **d.as_dict()}
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.config_path).stem + (f"_{args.weight_rounding}" if args.weight_rounding else "")
    name += "".join(f"_{peer}" for peer in args.peers) + ("_openvino" if args.openvino else "")
    (out / f"calibration_draws_{name}.md").write_text(table + "\n")
    write_json(out / f"calibration_draws_{name}.json", {"fp32": fp32, "rows": rows,
                                                         "versions": package_versions(),
                                                         "machine": machine(),
                                                         "cluster": cluster})


if __name__ == "__main__":
    main()
