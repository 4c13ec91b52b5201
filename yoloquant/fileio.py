"""Atomic writes: a failed run never leaves a half-written file or folder behind."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staging_dir(final_dir: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder beside `final_dir`; on success its files replace final_dir's.

    Files already in final_dir that the run did not produce are kept; each produced file is
    moved in with os.replace, so a crash mid-run leaves the earlier outputs untouched.
    """
    final = Path(final_dir)
    try:
        final.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging."))
    except OSError as exc:
        raise ConfigError(f"save_dir {final} is not writable: {exc}") from exc
    try:
        yield stage
        for item in sorted(stage.rglob("*")):
            if item.is_file():
                target = final / item.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
