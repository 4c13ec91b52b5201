"""Ray as the distributed backend (yoloquant/distributed): on a local cluster of 2 workers,
eval.py and analysis.py give exactly the single-process results on the demo model; a worker
killed mid-analysis leaves a checkpoint --resume completes; bad addresses fail fast; without
--ray_address Ray is never imported.

One local cluster is shared by the whole module (starting Ray takes ~5-10 s here)."""
import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from tiny_job import ROOT, run_script
from yoloquant.analysis import CHECKPOINT, RANK_JSON, run_analysis
from yoloquant.config import load_config
from yoloquant.distributed import TaskFailed, check_reachable, cluster as cluster_module, connect
from yoloquant.errors import ConfigError

pytest.importorskip("ray", reason="ray is in requirements.txt; this venv lacks it")

EVAL_IMAGES = 40
# 8 of the demo's 28 convs (the first, middle and head ones), 8 images: a sweep of a few seconds
LAYERS = ["conv2d_0.w_0", "conv2d_1.w_0", "conv2d_4.w_0", "conv2d_8.w_0", "conv2d_12.w_0",
          "conv2d_17.w_0", "conv2d_21.w_0", "conv2d_24.w_0"]


def demo_config(path: Path, save_dir: Path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw.update(save_dir=str(save_dir), analysis_max_images=8, analysis_layers=LAYERS,
               plot_hist=False, PTQ=dict(raw["PTQ"], batch_nums=4))
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """eval.py and analysis.py without --ray_address, in one fresh interpreter that then reports
    whether anything imported ray."""
    root = tmp_path_factory.mktemp("single")
    config = demo_config(root / "demo.yaml", root / "analysis")
    code = textwrap.dedent(f"""
        import runpy, sys
        for argv in (["eval.py", "--max_images", "{EVAL_IMAGES}", "--json", r"{root / 'eval.json'}"],
                     ["analysis.py", "--config_path", r"{config}"]):
            sys.argv = argv
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as exc:
                assert not exc.code, (argv, exc.code)
        print("RAY_IMPORTED", "ray" in sys.modules)
    """)
    proc = run_script_code(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, config, proc.stdout


def clean_env() -> dict:
    """This process's environment without what `import paddle` put there (OMP_NUM_THREADS=1),
    so that every script here runs in the same environment, before or after a test of this
    process imported Paddle (OMP_NUM_THREADS once changed the activation statistics' last
    digits through np.dot; analysis/statistics.py no longer uses it)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def run_script_code(code: str):
    import subprocess

    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(clean_env(), PYTHONPATH=str(ROOT)))


def run_clean(script: str, *args):
    import subprocess

    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=clean_env())


@pytest.fixture(scope="module")
def cluster():
    with connect("local", workers=2, threads=1) as c:
        yield c


def test_default_path_never_imports_ray(single):
    assert "RAY_IMPORTED False" in single[2]


def layers_of(save: Path) -> list:
    data = json.loads((save / RANK_JSON).read_text())
    return [{k: v for k, v in row.items() if k != "seconds"} for row in data["layers"]]


def test_eval_on_two_workers_equals_one_process(single, cluster, tmp_path):
    """eval.py joining the module's cluster by its address: the same mAP to the last digit."""
    out = tmp_path / "eval.json"
    proc = run_clean("eval.py", "--max_images", EVAL_IMAGES, "--json", out,
                      "--ray_address", cluster.address, "--ray_workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads((single[0] / "eval.json").read_text())
    spread = json.loads(out.read_text())
    for key in ("map50_95", "map50", "detections", "images"):
        assert spread[key] == alone[key], key
    assert spread["images"] == EVAL_IMAGES
    assert spread["cluster"]["nodes"] == 1 and spread["cluster"]["workers"] == 2
    assert spread["cluster"]["cpus"] == 2
    assert "on the Ray cluster" in proc.stdout


def test_paddle_eval_on_workers_equals_one_process(cluster):
    """Paddle Inference sessions on the workers (a model read from its path there)."""
    from yoloquant.evaluate import convert_for, evaluate_backend
    from yoloquant.runtime import (OnnxRuntimeBackend, PaddleInferenceBackend,
                                   PaddleModelFiles)
    from yoloquant.validator import preprocess_for, val_dataset

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    probe = OnnxRuntimeBackend(cfg.model_dir)
    converted = convert_for(cfg, val_dataset(cfg, preprocess_for(cfg, probe.input_shape),
                                             max_images=1))
    backend = PaddleInferenceBackend(PaddleModelFiles(converted.model_file, converted.params_file),
                                     threads=1)
    alone = evaluate_backend(cfg, backend, max_images=12, batch_size=2)
    spread = evaluate_backend(cfg, backend, max_images=12, batch_size=2, cluster=cluster)
    assert (spread.map50_95, spread.map50, spread.detections) == \
        (alone.map50_95, alone.map50, alone.detections)
    assert spread.runtime == alone.runtime == "paddle-inference(onednn-fp32)"


def test_analysis_on_two_workers_equals_one_process(single, cluster, tmp_path):
    """analysis.py joining the module's cluster: the same ranking and numbers, the cluster in
    sensitivity.json."""
    config = demo_config(tmp_path / "demo.yaml", tmp_path / "ray")
    proc = run_clean("analysis.py", "--config_path", config, "--ray_address", cluster.address,
                      "--ray_workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert layers_of(tmp_path / "ray") == layers_of(single[0] / "analysis")
    assert len(layers_of(tmp_path / "ray")) == len(LAYERS)
    data = json.loads((tmp_path / "ray" / RANK_JSON).read_text())
    alone = json.loads((single[0] / "analysis" / RANK_JSON).read_text())
    assert data["reference"] == alone["reference"] and data["spearman"] == alone["spearman"]
    assert data["meta"]["cluster"] == dict(cluster.as_dict(), address=cluster.address)
    assert "cluster" not in alone["meta"]
    assert (tmp_path / "ray" / "analysis.txt").read_text() == \
        (single[0] / "analysis" / "analysis.txt").read_text()


def measuring_workers() -> list[int]:
    """Pids of this test's Ray workers running a measure_layer task (descendants of this
    process: never another session's)."""
    def parent(pid):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title == b"ray::measure_layer":
            pid = up = int(entry)
            while up > 1 and up != os.getpid():
                up = parent(up)
            if up == os.getpid():
                found.append(pid)
    return found


class WorkerKiller(threading.Thread):
    """Kills one busy measuring worker once the checkpoint holds a first result."""

    def __init__(self, save: Path):
        super().__init__(daemon=True)
        self.save, self.killed, self.stop = save, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            try:
                done = len(json.loads((self.save / CHECKPOINT).read_text())["results"])
            except (OSError, ValueError, KeyError):
                done = 0
            busy = measuring_workers() if done else []
            if busy:
                os.kill(busy[0], 9)
                self.killed.append(busy[0])
            time.sleep(0.02)

    def __enter__(self) -> "WorkerKiller":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join()


def test_killed_worker_leaves_a_checkpoint_resume_completes(single, cluster, tmp_path,
                                                            monkeypatch):
    """No retries: the killed worker's task fails the run, which names --resume; the
    checkpoint keeps what finished and --resume gives the uninterrupted ranking."""
    monkeypatch.setattr(cluster_module, "TASK_RETRIES", 0)
    save = tmp_path / "killed"
    cfg = load_config(demo_config(tmp_path / "demo.yaml", save))
    with WorkerKiller(save) as killer, pytest.raises(TaskFailed, match="--resume"):
        run_analysis(cfg, cluster=cluster, progress=False)
    assert killer.killed, "no measure_layer worker was found to kill"
    done = len(json.loads((save / CHECKPOINT).read_text())["results"])
    assert 1 <= done < len(LAYERS)
    resumed = run_analysis(cfg, resume=True, cluster=cluster, progress=False)
    assert resumed.complete
    assert layers_of(save) == layers_of(single[0] / "analysis")


def test_killed_worker_is_retried(single, cluster, tmp_path):
    """With retries (the default) the killed worker's conv is measured again elsewhere."""
    save = tmp_path / "retried"
    cfg = load_config(demo_config(tmp_path / "demo.yaml", save))
    with WorkerKiller(save) as killer:
        result = run_analysis(cfg, cluster=cluster, progress=False)
    assert killer.killed, "no measure_layer worker was found to kill"
    assert result.complete and layers_of(save) == layers_of(single[0] / "analysis")


def test_stopped_driver_resumes_on_the_cluster(single, cluster, tmp_path):
    """A driver stopped after 3 layers (as by Ctrl-C: the tasks in flight are cancelled)
    resumes on the cluster to the same ranking."""
    save = tmp_path / "stopped"
    cfg = load_config(demo_config(tmp_path / "demo.yaml", save))
    first = run_analysis(cfg, stop_after=3, cluster=cluster, progress=False)
    assert not first.complete
    assert len(json.loads((save / CHECKPOINT).read_text())["results"]) == 3
    resumed = run_analysis(cfg, resume=True, cluster=cluster, progress=False)
    assert resumed.complete and layers_of(save) == layers_of(single[0] / "analysis")


def test_unreachable_address_is_one_line_in_seconds():
    start = time.monotonic()
    proc = run_script("eval.py", "--max_images", 4, "--ray_address", "127.0.0.1:9")
    took = time.monotonic() - start
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Ray cluster 127.0.0.1:9 is not reachable")
    assert "Traceback" not in proc.stderr
    assert took < 30  # the script's own start-up; the check itself is below
    start = time.monotonic()
    # TEST-NET: nothing answers (or, behind a proxy accepting any connection, no Ray GCS)
    with pytest.raises(ConfigError, match="198.51.100.7:6379"):
        check_reachable("198.51.100.7:6379", timeout=1.0)
    assert time.monotonic() - start < 3


def test_a_listener_that_is_not_ray_fails_fast(cluster, monkeypatch):
    """A port that accepts connections and never answers: ray.init would wait 40 s."""
    import socket

    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT", 1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConfigError, match=f"{address}.*not a Ray head node"):
            connect(address)
        assert time.monotonic() - start < 3


def test_bad_flags_and_missing_ray(monkeypatch):
    with pytest.raises(ConfigError, match="not 'local'"):
        connect("no-port-here:x")
    with pytest.raises(ConfigError, match="--ray_workers must be at least 1"):
        connect("local", workers=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install ray==2\.60\.0"):
        connect("local", workers=1)
