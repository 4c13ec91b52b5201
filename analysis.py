"""Which conv layers does quantization hurt? Rank them, and find the fewest to keep float.

  python analysis.py --config_path configs/yolov5n_analysis.yaml
  python analysis.py --config_path configs/yolov5n_analysis.yaml --resume   # after a kill
  python analysis.py --config_path ... --ray_address local --ray_workers 2  # convs as Ray tasks

Calibrates once, then measures every quantized conv both ways (only it int8 / only it float)
with ONNX Runtime on the first analysis_max_images evaluation images. save_dir receives
analysis.txt, sensitivity.csv/.json, statistic.csv, sensitivity_rank.png, hist_compare.png and
proxy_vs_map.png. With get_target_quant_model and target_metric it also saves the smallest float
fallback meeting the target in save_dir/target_quant_model (as post_quant.py would) and its
skip_tensor_list in save_dir/skip_tensor_list.yaml.
"""
import argparse

from yoloquant.cli import add_common_flags, run_main
from yoloquant.distributed import add_ray_flags


def main(args: argparse.Namespace) -> int:
    from yoloquant.analysis import analysis_command

    analysis_command(args.config_path, device=args.devices, resume=args.resume,
                     ray_address=args.ray_address, ray_workers=args.ray_workers,
                     ray_threads=args.ray_threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in save_dir (same config) instead of "
                             "starting over")
    add_ray_flags(parser)
    return parser


def interrupted(args: argparse.Namespace) -> str:
    from yoloquant.analysis import interrupted_note

    return interrupted_note(args.config_path)


if __name__ == "__main__":
    run_main(main, build_parser(), on_interrupt=interrupted)
