"""Where the optional real test/benchmark assets live (COCO subsets, real YOLO models).

They are never part of the repository. One setting finds them: the environment variable
YOLOQUANT_ASSETS, defaulting to ../shared/assets beside the checkout.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "YOLOQUANT_ASSETS"


def assets_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, REPO_ROOT.parent / "shared" / "assets")).resolve()


def asset(relative: str) -> Path:
    """Path of one asset; it may not exist (callers decide to skip or fail)."""
    return assets_dir() / relative


def have_assets() -> bool:
    return (assets_dir() / "models" / "yolov5n.onnx").is_file()
