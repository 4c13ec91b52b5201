"""Atomic writes: a failed run never leaves a half-written file or folder behind.

Every file and folder we create gets the mode the user's umask gives (`tempfile` would make
them private: 0600 files, 0700 folders). Scratch folders carry the pid of the process that made
them, so a later run removes those whose process is dead (a SIGKILL skips every `finally`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let write(tmp_path) produce the file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---- scratch folders that a later run can clean up -----------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove `parent/<prefix><pid>.<random>` folders whose process is gone; returns them."""
    removed = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for p in candidates:
        pid, dot, _ = p.name[len(prefix):].partition(".")  # <prefix><pid>.<random>
        if dot and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def scratch_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder `parent/<prefix><pid>.<random>` (mode from the umask); stale ones of the
    same prefix left by killed processes are removed first."""
    parent = Path(parent)
    remove_stale(parent, prefix)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{os.getpid()}."))
    os.chmod(path, dir_mode())
    return path


@contextmanager
def temporary_dir(prefix: str = "yoloquant-") -> Iterator[Path]:
    """Like tempfile.TemporaryDirectory, but a killed run's folder is removed by the next one."""
    path = scratch_dir(tempfile.gettempdir(), prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- output folders ------------------------------------------------------------------------
def existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above `path` that exists."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(final_dir: str | os.PathLike) -> None:
    """ConfigError unless `final_dir` could be created (or written, if it exists), checked by
    creating and removing a probe in the nearest existing folder: permission bits alone do not
    tell (root ignores them; read-only mounts do not show in them). Nothing is left behind."""
    final = Path(final_dir)
    if final.exists() and not final.is_dir():
        raise ConfigError(f"save_dir {final} exists and is not a folder: choose another save_dir")
    base = existing_ancestor(final)
    if not base.is_dir():
        raise ConfigError(f"save_dir {final} cannot be created: {base} is not a folder")
    try:
        probe = tempfile.mkdtemp(dir=base, prefix=".yoloquant-probe.")
        os.rmdir(probe)
    except OSError as exc:
        where = "" if base == final else f" ({base} does not let us create it)"
        raise ConfigError(f"save_dir {final} is not writable{where}: {exc.strerror or exc}; "
                          "choose a save_dir you can write to, or fix its permissions") from exc


def _stage_prefix(final: Path) -> str:
    return f".{final.name}.staging."


@contextmanager
def staging_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder beside `final_dir`; on success its files replace final_dir's.

    final_dir itself is created only then: a failed or interrupted run leaves no empty or
    partial folder. Files already in final_dir that the run did not produce are kept; each
    produced file is moved in with os.replace, so a crash mid-run leaves the earlier outputs
    untouched. The stage is named after this process's pid: a run killed with SIGKILL leaves
    it behind, and the next run staging for the same final_dir removes it.
    """
    final = Path(os.path.abspath(final_dir))
    check_writable(final)
    base = existing_ancestor(final.parent)
    try:
        stage = scratch_dir(base, _stage_prefix(final))
    except OSError as exc:
        raise ConfigError(f"save_dir {final} is not writable: {exc}") from exc
    try:
        yield stage
        _commit(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        try:
            os.rename(stage, final)  # the whole folder appears at once
            return
        except OSError:
            if not final.is_dir():  # a concurrent run created it: merge file by file
                raise
    for item in sorted(stage.rglob("*")):
        target = final / item.relative_to(stage)
        if item.is_dir():
            target.mkdir(exist_ok=True)
        else:
            os.replace(item, target)


def stale_stages(final_dir: str | os.PathLike) -> list[Path]:
    """Staging folders for final_dir that exist now (for tests and diagnostics)."""
    final = Path(os.path.abspath(final_dir))
    base = existing_ancestor(final.parent)
    return sorted(p for p in base.iterdir() if p.name.startswith(_stage_prefix(final)))
