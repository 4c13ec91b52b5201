"""What every run records next to its outputs: versions, machine, config, timings."""
from __future__ import annotations

import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path

from . import __version__

PACKAGES = ("paddlepaddle", "paddleslim", "x2paddle", "paddle2onnx", "onnx", "onnxruntime",
            "numpy", "opencv-python", "pycocotools")


def versions_of(names) -> dict:
    """Installed version of each distribution (None when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def package_versions() -> dict:
    return {"yoloquant": __version__, "python": platform.python_version(), **versions_of(PACKAGES)}


def machine() -> dict:
    import os

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Timer:
    """Named wall-clock timings: `with timer("calibration"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 2)

        return _Span()
