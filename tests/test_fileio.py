"""fileio: outputs appear complete or not at all, with the user's umask; killed runs' scratch
folders are removed by the next run."""
import os
import stat
import subprocess
import sys

import pytest

from yoloquant.errors import ConfigError
from yoloquant.fileio import (remove_stale, scratch_dir, stale_stages, staging_dir, write_json,
                              write_text)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it now (pids are not reused this quickly)


def test_scratch_folders_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / f".out.staging.{dead_pid()}.abc123"
    alive = tmp_path / f".out.staging.{os.getppid()}.def456"
    old_style = tmp_path / ".out.staging.x7k2m9q1"  # no pid: left alone
    other = tmp_path / f".other.staging.{dead_pid()}.zzz"
    for p in (dead, alive, old_style, other):
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "model.pdmodel").write_bytes(b"x" * 1000)
    new = scratch_dir(tmp_path, ".out.staging.")
    assert not dead.exists() and alive.exists() and old_style.exists() and other.exists()
    assert new.name.startswith(f".out.staging.{os.getpid()}.")
    assert remove_stale(tmp_path, ".other.staging.") == [other]


def test_failed_run_creates_nothing_and_a_good_one_keeps_other_files(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "a" / "out") as stage:
            (stage / "model.bin").write_bytes(b"new")
            raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []  # not even the parent
    final = tmp_path / "out"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    (final / "model.bin").write_bytes(b"old")
    with staging_dir(final) as stage:
        (stage / "model.bin").write_bytes(b"new")
        (stage / "sub").mkdir()
        (stage / "sub" / "x.json").write_text("{}")
    assert (final / "model.bin").read_bytes() == b"new" and (final / "notes.txt").read_text() == "mine"
    assert (final / "sub" / "x.json").is_file() and not stale_stages(final)


def test_unwritable_target_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not writable"):
        with staging_dir("/proc/yoloquant-out"):
            pass


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.txt", "x")
        with staging_dir(tmp_path / "out") as stage:
            (stage / "m.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    for p in (tmp_path / "a.json", tmp_path / "b.txt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
