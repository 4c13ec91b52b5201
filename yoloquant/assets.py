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


def missing_hint(path: str | os.PathLike) -> str:
    """For a missing path inside the asset folder: how that folder was found and how to point
    YOLOQUANT_ASSETS elsewhere ("" for any other path)."""
    p = Path(path).resolve()
    base = assets_dir()
    if p.exists() or base not in (p, *p.parents):
        return ""
    how = (f"{ENV_VAR}={os.environ[ENV_VAR]}" if ENV_VAR in os.environ
           else f"{ENV_VAR} is unset, so the default ../shared/assets beside the checkout")
    return (f" It lies in the asset folder {base} ({how}): set {ENV_VAR} to the folder that "
            "holds the shared models/ and coco/ (or fix the config's path).")
