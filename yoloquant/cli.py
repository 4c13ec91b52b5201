"""Shared pieces of the entry scripts: logging, device flag, error reporting."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from .errors import YoloQuantError

log = logging.getLogger("yoloquant")
DEVICES = ("cpu", "gpu")


def setup_logging(verbose: bool = False) -> None:
    """The console and run-log handlers of the 'yoloquant' logger (yoloquant.joblog)."""
    from . import joblog

    joblog.setup(verbose)


DEMO_CONFIG = "configs/demo.yaml"


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_path", default=DEMO_CONFIG,
                        help="YAML config (see configs/ and the README's key reference; default: "
                             f"{DEMO_CONFIG}, the offline demo, run from the repository root)")
    parser.add_argument("--devices", default="cpu", choices=DEVICES,
                        help="device to run Paddle on (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """--eval / --max_images, shared by the scripts that produce an INT8 model."""
    parser.add_argument("--eval", action="store_true",
                        help="evaluate FP32 and the INT8 models on the config's val set and "
                             "print the table")
    parser.add_argument("--max_images", type=int, default=None,
                        help="with --eval: the first N val images only")


def check_device(device: str) -> None:
    """Refuse a GPU request on a CPU-only Paddle build instead of silently running on CPU."""
    if device == "gpu":
        import paddle

        if not paddle.device.is_compiled_with_cuda():
            raise YoloQuantError("--devices gpu needs the GPU build of Paddle: "
                                 "pip install paddlepaddle-gpu==2.6.2 (or use --devices cpu)")


def load_job_config(config_path: str, device: str = "cpu", algo: Optional[str] = None):
    """What every job does first: check the device, load and validate the config, generate the
    offline demo's data set if the config needs it, and apply an --algo override."""
    from .config import load_config
    from .demo_data import maybe_generate_for

    check_device(device)
    cfg = load_config(config_path)
    maybe_generate_for(cfg)
    if algo:
        cfg.PTQ.algo = algo
    return cfg


def untouched(save_dir) -> str:
    """The Ctrl-C message of a job that stages its outputs (yoloquant.fileio.staging_dir)."""
    return f"interrupted; {save_dir} untouched"


def run_main(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             on_interrupt: Optional[Callable[[argparse.Namespace], str]] = None) -> None:
    """Parse flags, run, and turn user errors into one clear line and exit code 2, Ctrl-C into
    one line (`on_interrupt(args)`: what became of the outputs) and exit code 130."""
    args = parser.parse_args()
    setup_logging(getattr(args, "verbose", False))
    try:
        code = main(args)
    except YoloQuantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        try:
            message = on_interrupt(args) if on_interrupt else "interrupted"
        except Exception:  # noqa: BLE001 - the interrupt is what the user must hear about
            message = "interrupted"
        print(f"\n{message}", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
