"""Evaluate a float or quantized YOLO model on COCO (mAP@0.5:0.95 and mAP@0.5).

  python eval.py --config_path configs/yolov5n_coco_mini.yaml                 # float ONNX, ONNX Runtime
  python eval.py --config_path ... --runtime paddle                           # its Paddle conversion
  python eval.py --config_path ... --model out/               # a post_quant.py output, real int8 runtimes
  python eval.py --config_path ... --model out/model_int8.onnx --runtime openvino   # one file on OpenVINO
  python eval.py --config_path ... --model out/ --fidelity_images DIR   # against FP32, no labels
  python eval.py --config_path ... --ray_address local --ray_workers 2  # images sharded on Ray

Deltas against a reference model (--reference; FP32 by default for a post_quant.py output)
come with a paired bootstrap 95% interval over the images.
"""
import argparse

from yoloquant.cli import add_common_flags, run_main
from yoloquant.distributed import add_ray_flags
from yoloquant.evaluate import RUNTIMES, evaluate_command


def main(args: argparse.Namespace) -> int:
    evaluate_command(args.config_path, model=args.model, runtime=args.runtime,
                     batch_size=args.batch_size, json_out=args.json, device=args.devices,
                     max_images=args.max_images, simulate=args.simulate,
                     reference=args.reference, fidelity_images=args.fidelity_images,
                     fidelity_conf=args.fidelity_conf, ray_address=args.ray_address,
                     ray_workers=args.ray_workers, ray_threads=args.ray_threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--model", default=None,
                        help="an .onnx file or a Paddle inference model folder "
                             "(default: the config's model_dir)")
    parser.add_argument("--runtime", default=None, choices=RUNTIMES,
                        help="for the config's ONNX model (or an .onnx --model): onnxruntime "
                             "(default), openvino, paddle (the "
                             "X2Paddle conversion on Paddle Inference) or both")
    parser.add_argument("--batch_size", type=int, default=1, help="images per inference call")
    parser.add_argument("--max_images", type=int, default=None,
                        help="evaluate the first N images only")
    parser.add_argument("--simulate", action="store_true",
                        help="also run the float simulation of a quantized Paddle model "
                             "(labelled as such; deployment accuracy is the int8 rows)")
    parser.add_argument("--reference", default="auto", metavar="PATH|FP32|none",
                        help="compare with this model (.onnx or Paddle folder; FP32: the config's "
                             "float model): each row gets delta and delta_ci95 (paired bootstrap "
                             "over images). Default: FP32 for a post_quant.py output, else none")
    parser.add_argument("--fidelity_images", default=None, metavar="DIR",
                        help="instead of labelled mAP: agreement with the reference (FP32 unless "
                             "--reference) on the images of DIR, no annotations needed: mAP of "
                             "the model's detections against the reference's, and output SNR")
    parser.add_argument("--fidelity_conf", type=float, default=None,
                        help="with --fidelity_images: the reference's detections with at least "
                             "this score are the ground truth (default 0.25)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="write {map50_95, map50, images, runtime, seconds[, delta, "
                             "delta_ci95, ...]} (or the fidelity) to OUT")
    add_ray_flags(parser)
    return parser


if __name__ == "__main__":
    run_main(main, build_parser())
