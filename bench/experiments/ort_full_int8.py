"""Would quantizing the glue (Add, Concat, MaxPool, Resize, every SiLU) make our INT8 faster on
ONNX Runtime?  Builds that model with ORT's quantize_static but forces our Paddle-calibrated
scales on every tensor our QDQ ONNX already quantizes (TensorQuantOverrides); the other tensors
(glue outputs, SiLU internals) get ORT's MinMax ranges from the same calibration images.
bench/speed.py times the same model as "INT8 yoloquant scales + int8 glue (proposal)".

  python bench/experiments/ort_full_int8.py CONFIG OUR_QDQ.onnx OUT.onnx
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from speed import (calibration_images, our_activation_scales, peer_input_model,  # noqa: E402
                   quantize_ort)
from yoloquant.cli import setup_logging  # noqa: E402
from yoloquant.config import load_config  # noqa: E402


def main():
    setup_logging()
    cfg = load_config(sys.argv[1])
    ours = onnx.load(sys.argv[2])
    out = Path(sys.argv[3]).resolve()
    images, _, input_name = calibration_images(cfg, cfg.model_dir)
    model = peer_input_model(cfg.model_dir, images[0][None], input_name, out.parent)
    art = quantize_ort(model, images, input_name, out, overrides=our_activation_scales(ours),
                       label="ours + int8 glue")
    print(f"saved {out} in {art.quant_seconds:.0f} s; {art.notes}")


if __name__ == "__main__":
    main()
