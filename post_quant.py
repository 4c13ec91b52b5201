"""Post-training quantization of a YOLO ONNX model to a deployable INT8 model.

  python post_quant.py --config_path configs/yolov5n_coco_mini.yaml --save_dir out --eval

save_dir receives the INT8 Paddle inference model (model.pdmodel/.pdiparams), the INT8 QDQ
ONNX (model_int8.onnx) and summary.json (config, versions, calibration images, timings,
metrics). With --eval the job ends with FP32 vs INT8 mAP for each runtime.
"""
import argparse

from yoloquant.cli import add_common_flags, add_eval_flags, run_main, untouched
from yoloquant.config import PTQ_ALGOS


def main(args: argparse.Namespace) -> int:
    from yoloquant.ptq import post_quant_command

    post_quant_command(args.config_path, args.save_dir, algo=args.algo, device=args.devices,
                       evaluate=args.eval, max_images=args.max_images)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--save_dir", default="ptq_out", help="output folder (default: ptq_out)")
    parser.add_argument("--algo", default=None, choices=PTQ_ALGOS,
                        help="calibration algorithm (default: the config's PTQ.algo)")
    add_eval_flags(parser)
    return parser


if __name__ == "__main__":
    run_main(main, build_parser(), on_interrupt=lambda args: untouched(args.save_dir))
