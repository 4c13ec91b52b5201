"""Bad input and faults, as a user meets them on the command line: one `error:` line and exit
code 2 before any heavy work, Ctrl-C as one line and exit 130, and in every case nothing left
behind: no empty or partial save_dir, earlier outputs untouched, no stale staging folders."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from yoloquant.fileio import stale_stages

from tiny_job import (ROOT, conv_relu_onnx, make_job, relu_onnx, run_script,
                      without_permission_override)

SCRIPTS = ["post_quant.py", "fine_tune.py", "analysis.py"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_job")
    return root, make_job(root)


def args_for(script: str, config: Path, save_dir: Path, evaluate: bool = True) -> list:
    args = ["--config_path", config]
    if script != "analysis.py":
        args += ["--save_dir", save_dir] + (["--eval"] if evaluate else [])
    return args


def assert_one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_nothing_heavy_ran(proc, cache_dir: Path):
    """No calibration and no conversion started: the config's X2Paddle cache was not even
    created (every job converts first)."""
    assert "calibrating on" not in proc.stderr
    assert not cache_dir.exists()


# ---- models that are not detectors ---------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("maker", [relu_onnx, conv_relu_onnx], ids=["relu", "conv_relu"])
def test_a_model_that_is_not_a_detector_is_refused_first(job, tmp_path, script, maker):
    root, _ = job
    model = tmp_path / f"{maker.__name__}.onnx"
    maker(model)
    save = tmp_path / "out"
    cfg = make_job(root, model_dir=str(model), cache_dir=str(tmp_path / "cache"),
                   save_dir=str(save))
    proc = run_script(script, *args_for(script, cfg, save))
    assert_one_error_line(proc, str(model), "is not a YOLOv5 detector", "outputs 3-D")
    assert_nothing_heavy_ran(proc, tmp_path / "cache")
    assert not save.exists()


# ---- missing / corrupt inputs, checked before the PTQ --------------------------------------
def bad_inputs(root: Path, tmp: Path) -> dict:
    corrupt = tmp / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 10)
    malformed = tmp / "malformed.json"
    malformed.write_text('{"images": [')
    no_images = tmp / "no_images.json"
    no_images.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}],
                                     "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    return {
        "missing_model": ({"model_dir": str(tmp / "missing.onnx")}, ["missing.onnx", "not found"]),
        "corrupt_model": ({"model_dir": str(corrupt)}, ["corrupt.onnx", "corrupt or not an ONNX"]),
        "missing_val_images": ({"val_image_dir": str(tmp / "nowhere")}, ["nowhere", "does not exist"]),
        "val_images_not_there": ({"val_anno_path": str(no_images)}, ["missing from", "x.jpg"]),
        "malformed_val_annotations": ({"val_anno_path": str(malformed)},
                                      ["cannot parse annotation file", "malformed.json"]),
        "empty_calibration_folder": ({"train_image_dir": str(tmp / "empty"), "train_anno_path": None},
                                     ["no images", "empty"]),
    }


CASES = ["missing_model", "corrupt_model", "missing_val_images", "val_images_not_there",
         "malformed_val_annotations", "empty_calibration_folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_before_any_work_and_leaves_nothing(job, tmp_path, case):
    root, _ = job
    (tmp_path / "empty").mkdir()
    overrides, fragments = bad_inputs(root, tmp_path)[case]
    save = tmp_path / "out"
    cfg = make_job(root, cache_dir=str(tmp_path / "cache"), save_dir=str(save), **overrides)
    proc = run_script("post_quant.py", *args_for("post_quant.py", cfg, save))
    assert_one_error_line(proc, *fragments)
    assert_nothing_heavy_ran(proc, tmp_path / "cache")
    assert not save.exists() and not stale_stages(save)


@pytest.mark.parametrize("script", ["fine_tune.py", "analysis.py"])
@pytest.mark.parametrize("case", ["missing_model", "malformed_val_annotations"])
def test_other_jobs_check_their_inputs_first(job, tmp_path, script, case):
    root, _ = job
    overrides, fragments = bad_inputs(root, tmp_path)[case]
    save = tmp_path / "out"
    cfg = make_job(root, cache_dir=str(tmp_path / "cache"), save_dir=str(save), **overrides)
    proc = run_script(script, *args_for(script, cfg, save))
    assert_one_error_line(proc, *fragments)
    assert_nothing_heavy_ran(proc, tmp_path / "cache")
    assert not save.exists()


def test_a_missing_asset_names_yoloquant_assets(job, tmp_path):
    root, _ = job
    cfg = make_job(root, model_dir="${YOLOQUANT_ASSETS}/models/not_there.onnx",
                   cache_dir=str(tmp_path / "cache"))
    proc = run_script("post_quant.py", "--config_path", cfg, "--save_dir", tmp_path / "out",
                      env={"YOLOQUANT_ASSETS": str(tmp_path / "assets")})
    line = assert_one_error_line(proc, "not_there.onnx")
    assert f"YOLOQUANT_ASSETS={tmp_path / 'assets'}" in line and "set YOLOQUANT_ASSETS" in line


# ---- save_dir that cannot be written -------------------------------------------------------
@pytest.mark.parametrize("where", ["existing", "inside"])
def test_unwritable_save_dir_is_refused_before_the_job(job, tmp_path, where):
    """As a non-root user would see it (see without_permission_override)."""
    root, _ = job
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "earlier.txt").write_text("kept")
    locked.chmod(0o555)
    save = locked if where == "existing" else locked / "out"
    cfg = make_job(root, cache_dir=str(tmp_path / "cache"))
    try:
        proc = run_script("post_quant.py", "--config_path", cfg, "--save_dir", save, "--eval",
                          preexec_fn=without_permission_override)
    finally:
        locked.chmod(0o755)
    assert_one_error_line(proc, str(save), "not writable", "Permission denied")
    assert_nothing_heavy_ran(proc, tmp_path / "cache")
    assert sorted(p.name for p in locked.iterdir()) == ["earlier.txt"]


# ---- outputs: one complete folder, the user's umask ----------------------------------------
def test_outputs_use_the_umask_and_carry_their_log(job, tmp_path):
    root, _ = job
    save = tmp_path / "deep" / "out"  # parents are created too, when the job is done
    cfg = make_job(root)
    proc = subprocess.run([sys.executable, "post_quant.py", "--config_path", str(cfg),
                           "--save_dir", str(save), "--eval"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in save.iterdir())
    assert names == ["model.pdiparams", "model.pdmodel", "model_int8.onnx", "run.log",
                     "summary.json"]
    for p in [save, save.parent, *save.iterdir()]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    log = (save / "run.log").read_text()
    assert "calibrating on 4 images" in log and "outputs saved in" in log
    assert "mAP50-95" in log  # the table printed on stdout is in the log too
    assert "Sampling stage" not in proc.stderr + log  # Paddle's own bars
    assert "old way to load inference model" not in proc.stderr + log
    summary = json.loads((save / "summary.json").read_text())
    # --eval metrics are part of the saved summary: FP32 and every INT8 runtime
    assert [m["runtime"] for m in summary["metrics"]] == [
        "onnxruntime", "paddle-inference(onednn-int8)", "onnxruntime", "openvino"]


def test_umask_027_is_followed_too(job, tmp_path):
    root, _ = job
    save = tmp_path / "out"
    proc = subprocess.run([sys.executable, "post_quant.py", "--config_path", str(make_job(root)),
                           "--save_dir", str(save)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for p in [save, *save.iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p


def test_fine_tune_and_post_quant_default_to_different_folders():
    import importlib.util

    defaults = {}
    for script in ("post_quant.py", "fine_tune.py"):
        spec = importlib.util.spec_from_file_location(script[:-3] + "_script", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        defaults[script] = module.build_parser().parse_args([]).save_dir
    assert defaults == {"post_quant.py": "ptq_out", "fine_tune.py": "fine_tune_out"}
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/ptq_out/" in ignored and "/fine_tune_out/" in ignored


# ---- Ctrl-C and SIGKILL --------------------------------------------------------------------
def start_demo(save: Path, *extra) -> subprocess.Popen:
    """The README's demo job (post_quant.py on configs/demo.yaml), progress logged at every
    step so the test can tell where it is.

    The signal tests stop it at the first line of its evaluation, which scores all 300 demo
    images in three runtimes (a window of seconds for the signal)."""
    return subprocess.Popen(
        [sys.executable, "post_quant.py", "--config_path", "configs/demo.yaml", "--save_dir",
         str(save), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, YOLOQUANT_PROGRESS_SECONDS="0"), preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the child before exec: SIGINT delivered and handled as in a user's shell. A child
    inherits an ignored or blocked SIGINT from this test process, and in the full suite (not
    alone) the job ran to the end through the test's SIGINT twice."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 600) -> list:
    lines, end = [], time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return lines
        assert time.monotonic() < end, "".join(lines[-20:])
    raise AssertionError(f"the job ended before {text!r}: {''.join(lines[-20:])}")


@pytest.fixture(scope="module")
def demo_data():
    """The demo data set (generated on first use, as the job would)."""
    from yoloquant.demo_data import ensure_demo_data

    ensure_demo_data(ROOT / "cache" / "demo_data")


def test_ctrl_c_is_one_line_and_leaves_save_dir_as_it_was(demo_data, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "summary.json").write_text('{"earlier": true}')
    proc = start_demo(save, "--eval")
    wait_for(proc, "eval model.pdmodel")  # mid-run: quantized, evaluating the staged model
    assert stale_stages(save)  # the run's outputs exist, staged beside save_dir
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted; {save} untouched"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert sorted(p.name for p in save.iterdir()) == ["summary.json"]
    assert (save / "summary.json").read_text() == '{"earlier": true}'
    assert not stale_stages(save)


def test_a_killed_run_leaves_no_stale_stage_after_the_next_run(demo_data, tmp_path):
    save = tmp_path / "out"
    proc = start_demo(save, "--eval")
    wait_for(proc, "eval model.pdmodel")
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.communicate(timeout=60)
    left = stale_stages(save)
    assert left and not save.exists()  # what a kill leaves: the hidden stage only
    assert sum(f.stat().st_size for f in left[0].rglob("*") if f.is_file()) > 100_000
    again = start_demo(save)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert not stale_stages(save)
    assert (save / "model.pdmodel").is_file() and (save / "summary.json").is_file()


def test_analysis_outputs_and_checkpoint_use_the_umask(job, tmp_path):
    root, _ = job
    save = tmp_path / "analysis"
    cfg = make_job(root, save_dir=str(save), PTQ={"algo": "abs_max", "batch_nums": 4})
    proc = subprocess.run([sys.executable, "analysis.py", "--config_path", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in save.iterdir()}
    assert {"sensitivity.json", "analysis_checkpoint.json", "analysis_calibration.json",
            "analysis.txt", "run.log"} <= names
    for p in save.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
    assert "float mAP" in (save / "run.log").read_text()


def test_analysis_interrupt_note_says_what_resume_continues(job, tmp_path):
    from yoloquant.analysis import CHECKPOINT, interrupted_note

    root, _ = job
    save = tmp_path / "a"
    cfg = make_job(root, save_dir=str(save))
    assert interrupted_note(str(cfg)) == f"interrupted; nothing to resume in {save} yet"
    save.mkdir()
    (save / CHECKPOINT).write_text(json.dumps({"results": {"conv0": {}, "conv1": {}}}))
    assert interrupted_note(str(cfg)) == (f"interrupted; {save / CHECKPOINT} keeps the 2 layer(s) "
                                          "finished: run again with --resume to continue")
