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


# CPU features that change which int8 kernels ONNX Runtime (MLAS) and oneDNN run, and so move
# int8 results by tenths of a point between machines of the same kind.
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def machine() -> dict:
    """CPU model, the int8-relevant CPU flags, core count and OS, for every result we record."""
    import os

    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    # "Intel(R) Xeon(R) Processor" names several generations on VMs: family/model tells them apart
    family_model = "/".join(fields[k] for k in ("cpu family", "model") if k in fields)
    return {"cpu": fields.get("model name", platform.processor()), "cpu_family_model": family_model,
            "cpu_flags": [f for f in INT8_CPU_FLAGS if f in flags],
            "cores": os.cpu_count(), "system": platform.platform()}


def machine_line(info: dict | None = None) -> str:
    """One line naming the CPU and its int8 flags, for the head of a benchmark table."""
    info = info or machine()
    flags = ", ".join(info.get("cpu_flags") or []) or "no AVX-512/VNNI/AMX flags"
    family_model = f", family/model {info['cpu_family_model']}" if info.get("cpu_family_model") else ""
    return f"CPU: {info['cpu']}{family_model} ({flags}), {info['cores']} cores"


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
