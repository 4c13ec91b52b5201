"""Post-training quantization with learned weight rounding (AdaRound / BRECQ / QDrop).

  python fine_tune.py --config_path configs/yolov5n_coco_mini.yaml --save_dir out_adaround --eval
  python fine_tune.py ... --recon_level region-wise                              # BRECQ
  python fine_tune.py ... --recon_level region-wise --simulate_activation_quant  # QDrop (drop_prob)

save_dir receives the same files as post_quant.py (model.pdmodel/.pdiparams INT8 Paddle,
model_int8.onnx QDQ ONNX, summary.json), with the learned int8 weights in both models, and in
summary.json the loss of every layer/region before and after, the share of re-rounded weights and
the timings. Activation scales come from calibration (--algo).
"""
import argparse

from yoloquant.cli import add_common_flags, add_eval_flags, run_main, untouched
from yoloquant.config import PTQ_ALGOS
from yoloquant.reconstruct import RECON_LEVELS


def main(args: argparse.Namespace) -> int:
    from yoloquant.fine_tune import fine_tune_command

    fine_tune_command(args.config_path, args.save_dir, algo=args.algo, device=args.devices,
                      recon_level=args.recon_level,
                      simulate_activation_quant=args.simulate_activation_quant,
                      epochs=args.epochs, lr=args.lr, limit=args.limit, evaluate=args.eval,
                      max_images=args.max_images)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--save_dir", default="fine_tune_out",
                        help="output folder (default: fine_tune_out; post_quant.py's is ptq_out)")
    parser.add_argument("--algo", default="avg", choices=PTQ_ALGOS,
                        help="calibration algorithm of the activation scales (default: avg)")
    parser.add_argument("--recon_level", default="layer-wise", choices=RECON_LEVELS,
                        help="layer-wise: AdaRound, one conv (+ its SiLU) at a time; region-wise: "
                             "BRECQ, blocks found from the graph optimised jointly")
    parser.add_argument("--simulate_activation_quant", action="store_true",
                        help="fake-quantize conv inputs while learning the rounding (QDrop keeps "
                             "each activation float with probability drop_prob from the config)")
    parser.add_argument("--epochs", type=int, default=25,
                        help="passes over each layer's/region's cached crops (default 25: 200 steps)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="Adam learning rate of the rounding variables (default 0.01)")
    parser.add_argument("--limit", type=int, default=6,
                        help="max convs per region with region-wise (default 6)")
    add_eval_flags(parser)
    return parser


if __name__ == "__main__":
    run_main(main, build_parser(), on_interrupt=lambda args: untouched(args.save_dir))
