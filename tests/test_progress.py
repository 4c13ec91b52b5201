"""progress + joblog: a line every few seconds when the output is not a terminal, and every
line of a job in its run.log."""
import io
import logging

import numpy as np
import pytest

from yoloquant import joblog
from yoloquant.data import ImageFolder, iterate_batches
from yoloquant.preprocess import Preprocess
from yoloquant.progress import Progress, progress


def lines(caplog):
    return [r.getMessage() for r in caplog.records if getattr(r, "progress", False)]


def test_lines_every_interval_with_count_and_time_left(caplog, monkeypatch):
    monkeypatch.setenv("YOLOQUANT_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="yoloquant"):
        for _ in progress(range(4), desc="eval x", unit="img"):
            pass
    got = lines(caplog)
    assert got[0].startswith("eval x: 1/4 img (25%)") and "s left" in got[0]
    assert got[-1].startswith("eval x: 4/4 img (100%)") and got[-1].endswith("(done)")


def test_quiet_when_short_or_disabled(caplog, monkeypatch):
    monkeypatch.setenv("YOLOQUANT_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="yoloquant"):
        list(progress(range(50), desc="fast"))  # finishes before the first line is due
        monkeypatch.setenv("YOLOQUANT_PROGRESS_SECONDS", "0")
        list(progress(range(5), desc="off", enabled=False))
        with Progress(3, "bar only", lines=False) as p:
            p.update(3)
    assert lines(caplog) == []


def test_loading_images_logs_progress_without_a_terminal(tmp_path, caplog, monkeypatch):
    import cv2

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), np.full((20, 30, 3), 100, np.uint8))
    monkeypatch.setenv("YOLOQUANT_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="yoloquant"):
        batches = list(iterate_batches(ImageFolder(tmp_path, Preprocess((32, 32))), desc="calib"))
    assert len(batches) == 3
    assert lines(caplog)[-1] == lines(caplog)[-1].split(",")[0] + ", 0 s (done)"
    assert lines(caplog)[-1].startswith("calib: 3/3 img")


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_console_drops_progress_lines_on_a_terminal_only():
    rec = logging.LogRecord("yoloquant", logging.INFO, __file__, 1, "eval: 1/2", None, None)
    rec.progress = True
    plain = logging.LogRecord("yoloquant", logging.INFO, __file__, 1, "hello", None, None)
    for stream, expect in ((Tty(), "hello\n"), (io.StringIO(), "eval: 1/2\nhello\n")):
        handler = joblog.ConsoleHandler(stream)
        handler.emit(rec)
        handler.emit(plain)
        assert stream.getvalue() == expect


def test_run_log_holds_lines_until_attached_then_appends(tmp_path):
    handler = joblog.RunLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for msg in ("before", "also before"):
        handler.emit(logging.LogRecord("yoloquant", logging.INFO, __file__, 1, msg, None, None))
    assert not (tmp_path / "run.log").exists()
    handler.attach(tmp_path / "run.log")
    handler.emit(logging.LogRecord("yoloquant", logging.INFO, __file__, 1, "after", None, None))
    handler.write("a table\nof two lines")
    handler.detach()
    handler.emit(logging.LogRecord("yoloquant", logging.INFO, __file__, 1, "dropped", None, None))
    handler.detach()  # a later job does not inherit this one's lines
    handler.attach(tmp_path / "run.log")
    handler.close()
    assert (tmp_path / "run.log").read_text() == "before\nalso before\nafter\na table\nof two lines\n"


def test_staged_run_log_lands_with_the_outputs(tmp_path, monkeypatch, caplog):
    handler = joblog.RunLogHandler()
    monkeypatch.setattr(joblog, "_run_log", handler)
    log = logging.getLogger("yoloquant")
    log.addHandler(handler)
    caplog.set_level(logging.INFO, logger="yoloquant")
    try:
        log.warning("config loaded")
        with pytest.raises(RuntimeError):
            with joblog.staged_run(tmp_path / "failed") as stage:
                (stage / "half.bin").write_bytes(b"x")
                raise RuntimeError("the job failed")
        assert not (tmp_path / "failed").exists()
        log.warning("second job")
        with joblog.staged_run(tmp_path / "out") as stage:
            (stage / "model.bin").write_bytes(b"x")
            log.warning("working")
    finally:
        log.removeHandler(handler)
    text = (tmp_path / "out" / joblog.RUN_LOG).read_text()
    assert "second job" in text and "working" in text and "outputs saved in" in text
    assert "config loaded" not in text and "the job failed" not in text
