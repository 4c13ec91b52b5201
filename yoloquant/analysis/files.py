"""Names of the files analysis.py writes into save_dir."""

CHECKPOINT = "analysis_checkpoint.json"
CALIBRATION = "analysis_calibration.json"
CALIBRATED_MODEL = "analysis_model.onnx"  # the graph the scales refer to (opset-upgraded if needed)
RANK_CSV = "sensitivity.csv"
RANK_JSON = "sensitivity.json"
RANK_TXT = "analysis.txt"
STAT_CSV = "statistic.csv"
RANK_PNG = "sensitivity_rank.png"
HIST_PNG = "hist_compare.png"
PROXY_PNG = "proxy_vs_map.png"  # analysis_metric: map
SPLIT_PNG = "split_half.png"  # the ranking key on one half of the images against the other
SKIP_YAML = "skip_tensor_list.yaml"
TARGET_DIR = "target_quant_model"
