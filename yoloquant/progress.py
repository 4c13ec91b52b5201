"""Progress of long loops: a tqdm bar on a terminal, and always a log line every few seconds.

A bar is useless in CI, under nohup or in a log file (tqdm turns itself off there and the job
looks hung: eval ran 71 s silent). So every Progress also logs "desc: n/total unit, elapsed,
time left" at most every `interval()` seconds. Those records carry `progress=True`: the console
handler drops them while a bar shows the same thing, the run log (run.log) keeps them.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, Optional

log = logging.getLogger("yoloquant")

INTERVAL_ENV = "YOLOQUANT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 5.0


def interval() -> float:
    """Seconds between two progress lines ($YOLOQUANT_PROGRESS_SECONDS, default 5)."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """`with Progress(total, "eval", "img") as p: ... p.update()`; `enabled=False` is silent."""

    def __init__(self, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, lines: bool = True):
        """lines=False: the bar only (for loops that log their own line per step)."""
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.lines = enabled and lines
        self.n = self._start_n = initial
        self._start = self._last = time.monotonic()
        self._logged = False
        self._postfix = ""
        self._bar = None
        if enabled and stderr_is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if self.lines and now - self._last >= interval():
            self._last = now
            self._log(now)

    def set_postfix(self, text: str) -> None:
        """A note on the current step (shown by the bar and in the next log line)."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        now = time.monotonic()
        if self.lines and now - self._last >= interval():
            self._last = now
            self._log(now)

    def _log(self, now: float, done: bool = False) -> None:
        elapsed = now - self._start
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        text = f"{self.desc}: {count} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {elapsed:.0f} s"
        made = self.n - self._start_n
        if done:
            text += " (done)"
        else:
            if self.total and made > 0:
                text += f", about {elapsed / made * (self.total - self.n):.0f} s left"
            if self._postfix:
                text += f"; {self._postfix}"
        log.info("%s", text, extra={"progress": True})
        self._logged = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.lines and self._logged:  # a log that said "12/300" also says it finished
            self._log(time.monotonic(), done=True)
            self._logged = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable, total: Optional[int] = None, desc: str = "", unit: str = "it",
             enabled: bool = True) -> Iterator:
    """Iterate `iterable` with a Progress."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, unit, enabled) as p:
        for item in iterable:
            yield item
            p.update()
