"""Benchmark: analysis.py on a local Ray cluster, 1 worker against 2 (1 thread each).

  python bench/ray_scaling.py --config_path configs/yolov5n_analysis.yaml --images 16 --rounds 2

Runs analysis.py (the whole job: calibration, references, the per-conv sweep, the report) as a
user would, alternating the worker counts round by round so that a machine loaded by other work
slows both alike, and the single-process run (no Ray) once per round as the baseline. Reads each
run's timings and per-conv task seconds from its sensitivity.json, checks the rankings are
identical, and writes a Markdown table with a projection for larger models and image sets
(--project_convs, --project_images, --project_gflops) to --out.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from yoloquant.provenance import machine, machine_line  # noqa: E402

YOLOV5N_GFLOPS = 4.5  # at 640x640 (ultralytics' figure); the projection scales per-image time


def run(config: Path, save: Path, ray_workers) -> dict:
    args = [sys.executable, str(ROOT / "analysis.py"), "--config_path", str(config)]
    if ray_workers:
        args += ["--ray_address", "local", "--ray_workers", str(ray_workers), "--ray_threads", "1"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"analysis.py failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    data = json.loads((save / "sensitivity.json").read_text())
    tasks = [row["seconds"] for row in data["layers"]]
    ranking = [row["onnx_node"] for row in data["layers"]]
    return {"workers": ray_workers, "wall": wall, "seconds": data["seconds"], "load1": load,
            "task_median": statistics.median(tasks), "task_sum": sum(tasks), "tasks": len(tasks),
            "ranking": ranking, "layers": [{k: v for k, v in r.items() if k != "seconds"}
                                           for r in data["layers"]],
            "cluster": data["meta"].get("cluster")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_path", default="configs/yolov5n_analysis.yaml")
    parser.add_argument("--images", type=int, default=16, help="analysis_max_images")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--project_convs", type=int, default=150)
    parser.add_argument("--project_images", type=int, default=5000)
    parser.add_argument("--project_gflops", type=float, default=45.3,
                        help="the projected model's GFLOPs at 640 (YOLOv6s: 45.3)")
    parser.add_argument("--project_cores", type=int, default=32, help="cores per projected node")
    parser.add_argument("--out", default="bench/results/ray_scaling.md")
    parser.add_argument("--table_from", default=None, metavar="JSON",
                        help="only rebuild the table from an earlier run's JSON")
    args = parser.parse_args()
    raw = yaml.safe_load(Path(args.config_path).read_text())
    if args.table_from:
        data = json.loads(Path(args.table_from).read_text())
        write_table(args, raw, data["runs"], data["identical"], data["machine"])
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [1, 2, None] if r % 2 == 0 else [2, 1, None]
            for workers in order:
                save = Path(tmp) / f"r{r}_w{workers}"
                cfg = dict(raw, save_dir=str(save), analysis_max_images=args.images,
                           get_target_quant_model=False, plot_hist=False)
                config = Path(tmp) / f"r{r}_w{workers}.yaml"
                config.write_text(yaml.safe_dump(cfg))
                runs.append(run(config, save, workers))
                print({k: v for k, v in runs[-1].items() if k not in ("ranking", "layers")},
                      flush=True)
    same = all(r["layers"] == runs[0]["layers"] for r in runs)
    write_table(args, raw, runs, same, machine())


def write_table(args, raw: dict, runs: list, same: bool, where: dict) -> None:
    lines = [machine_line(where), "",
             f"analysis.py on {Path(raw['model_dir']).name}: {runs[0]['tasks']} convs x 2 "
             f"variants x {args.images} images (analysis_metric {raw.get('analysis_metric', 'noise')}),"
             f" local Ray cluster, 1 thread per worker; {args.rounds} interleaved rounds. "
             f"Identical rankings and numbers in every run: {same}.", "",
             "| run | round | workers | wall s | sweep s | calibrate s | median task s | sum of task s | concurrency | load1 at start |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        name = f"Ray, {r['workers']} worker(s)" if r["workers"] else "one process (no Ray)"
        lines.append(f"| {name} | {i // 3} | {r['workers'] or '-'} | {r['wall']:.1f} | "
                     f"{r['seconds']['sweep']:.1f} | {r['seconds'].get('calibrate', 0):.1f} | "
                     f"{r['task_median']:.2f} | {r['task_sum']:.1f} | "
                     f"{r['task_sum'] / r['seconds']['sweep']:.2f} | {r['load1']:.1f} |")
    sweep = {w: statistics.mean(r["seconds"]["sweep"] for r in runs if r["workers"] == w)
             for w in (1, 2)}
    wall = {w: statistics.mean(r["wall"] for r in runs if r["workers"] == w) for w in (1, 2)}
    task1 = statistics.median(r["task_median"] for r in runs if r["workers"] == 1)
    per_image = task1 / (2 * args.images)
    lines += ["", f"Mean over rounds: sweep 1 worker {sweep[1]:.1f} s, 2 workers {sweep[2]:.1f} s, "
              f"ratio {sweep[1] / sweep[2]:.2f}; whole job wall {wall[1]:.1f} s vs {wall[2]:.1f} s, "
              f"ratio {wall[1] / wall[2]:.2f}.", ""]
    scale = args.project_gflops / YOLOV5N_GFLOPS
    cpu_s = args.project_convs * 2 * args.project_images * per_image * scale
    lines += [f"Projection: a task (one conv, both variants) costs {task1:.2f} s on 1 worker "
              f"thread here, {per_image * 1000:.0f} ms per image and variant (forward pass, "
              f"decode, noise; QDQ build and session creation spread over the images). A "
              f"{args.project_gflops:g}-GFLOP model ({scale:.1f}x yolov5n) with "
              f"{args.project_convs} convs on {args.project_images} images: "
              f"{args.project_convs} tasks of {2 * args.project_images * per_image * scale / 60:.0f} "
              f"min each, {cpu_s / 3600:.0f} CPU-hours in all.", "",
              f"| nodes ({args.project_cores} cores, 1 thread per worker) | workers | sweep wall (ideal) |",
              "|---|---|---|"]
    for nodes in (1, 2, 4, 8, 16):
        workers = min(nodes * args.project_cores, args.project_convs)
        waves = -(-args.project_convs // workers)
        task_s = 2 * args.project_images * per_image * scale
        lines.append(f"| {nodes} | {workers} | {waves * task_s / 3600:.1f} h ({waves} wave(s) of tasks) |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    if not args.table_from:
        out.with_suffix(".json").write_text(json.dumps(
            {"runs": [{k: v for k, v in r.items() if k != "layers"} for r in runs],
             "machine": where, "identical": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
