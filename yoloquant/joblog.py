"""Where a job's log lines go: the console, and the run's own log file in save_dir.

The console handler writes through tqdm when stderr is a terminal (log lines then do not tear
a progress bar) and drops the periodic progress lines a bar already shows. The run log keeps
every line: records are held in memory until the job has a folder for them (`attach`, e.g. the
staging folder of post_quant, which becomes save_dir), then written there as they come, so
run.log appears with the other outputs and only when they do.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .fileio import file_mode, staging_dir

log = logging.getLogger("yoloquant")
RUN_LOG = "run.log"
_MAX_PENDING = 20000  # lines held before a job attaches its run log
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class ConsoleHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty and getattr(record, "progress", False):
            return  # the bar shows it
        if not tty:
            return super().emit(record)
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise; report as logging does
            self.handleError(record)


class RunLogHandler(logging.Handler):
    """Holds records until attached to a file, then appends to it (see module doc)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
        # bounded: a library user (e.g. a benchmark) may log for hours and never attach
        self._pending: deque = deque(maxlen=_MAX_PENDING)
        self._file = None
        self.path: Optional[Path] = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - as above
            self.handleError(record)

    def write(self, text: str) -> None:
        """A line (or block) that belongs in the run log but not on the console."""
        if self._file is None:
            self._pending.append(text)
        else:
            self._file.write(text + "\n")
            self._file.flush()

    def attach(self, path: str | os.PathLike) -> None:
        if self._file is not None:
            self._file.close()
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, file_mode())
        self._file = os.fdopen(fd, "a")
        for text in self._pending:
            self._file.write(text + "\n")
        self._file.flush()
        self._pending.clear()

    def detach(self) -> None:
        """Stop writing to the file; later records are held again (for the next attach)."""
        if self._file is not None:
            self._file.close()
        self._file, self.path = None, None
        self._pending.clear()

    def close(self) -> None:
        self.detach()
        super().close()


_run_log: Optional[RunLogHandler] = None


def setup(verbose: bool = False) -> None:
    """Our handlers on the 'yoloquant' logger (once): `import paddle` resets the root logger
    to WARNING, which would hide every progress line if we relied on basicConfig."""
    global _run_log
    if any(getattr(h, "_yoloquant", False) for h in log.handlers):
        return
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    _run_log = RunLogHandler()
    for h in (console, _run_log):
        h._yoloquant = True
        log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    _run_log.setLevel(logging.INFO if not verbose else logging.DEBUG)
    log.propagate = False


def attach(path: str | os.PathLike) -> None:
    """Write the run log to `path` from now on (with what was logged before). No-op when the
    job runs without our handlers (library use, tests)."""
    if _run_log is not None:
        _run_log.attach(path)


def detach() -> None:
    if _run_log is not None:
        _run_log.detach()


def note(text: str) -> None:
    """Text for the run log only (e.g. the results table the job prints on stdout)."""
    if _run_log is not None:
        _run_log.write(text)


@contextmanager
def staged_run(save_dir: str | os.PathLike) -> Iterator[Path]:
    """A job's staging folder (fileio.staging_dir) with its run log (run.log) inside: the
    outputs and their log appear in save_dir together, when the block ends without error.
    The log stays attached until the final "saved" line, written after the move."""
    try:
        with staging_dir(save_dir) as stage:
            attach(stage / RUN_LOG)
            yield stage
        log.info("outputs saved in %s", save_dir)
    finally:
        detach()
