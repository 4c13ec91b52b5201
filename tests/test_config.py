import logging
from pathlib import Path

import pytest

from yoloquant.assets import ENV_VAR
from yoloquant.config import Config, load_config, reference_table, require
from yoloquant.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
SEED_CONFIGS = ["yolov5s_ptq", "yolov6s_ptq", "yolov6s_analysis", "yolov6s_analyzed_ptq",
                "yolov6s_fine_tune", "yolov7_ptq", "yolov7_analysis"]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_all_shipped_configs_load_and_the_seed_files_are_there():
    names = {p.stem for p in CONFIGS}
    assert set(SEED_CONFIGS) <= names
    assert {"yolov5n_coco_mini", "yolox_nano_coco_mini"} <= names
    lite = {f"yolov6lite_m_{size}_{job}" for size in (320, 640) for job in ("ptq", "analysis", "fine_tune")}
    assert lite <= names
    for name in sorted(lite):  # the real YOLOv6-Lite models of the shared assets, at their size
        cfg = load_config(CONFIGS[0].parent / f"{name}.yaml")
        assert cfg.arch == "YOLOv6" and cfg.model_dir.endswith(f"yolov6lite_m_{name.split('_')[2]}.onnx")
        assert cfg.train_image_dir == "train2017_mini/images" and cfg.PTQ.calib_split == "train"
    for p in CONFIGS:
        cfg = load_config(p)
        assert cfg.model_dir, p


def test_seed_keys_keep_their_meaning(tmp_path):
    cfg = load_config(write(tmp_path, """
arch: YOLOv7
model_dir: ./m.onnx
dataset_dir: /data/coco
val_image_dir: val2017
val_anno_path: /abs/instances.json
skip_tensor_list: ['conv2d_2.w_0']
get_target_quant_model: true
target_metric: 0.45
PTQ:
  weight_quantize_type: abs_max
  batch_nums: 5
"""))
    assert cfg.arch == "YOLOv7" and cfg.model_dir == "./m.onnx"
    assert cfg.data_path(cfg.val_image_dir) == "/data/coco/val2017"
    assert cfg.data_path(cfg.val_anno_path) == "/abs/instances.json"  # absolute stays absolute
    assert cfg.skip_tensor_list == ["conv2d_2.w_0"]
    assert cfg.PTQ.weight_quantize_type == "abs_max" and cfg.PTQ.batch_nums == 5
    assert cfg.PTQ.algo == "avg"  # not the seed's KL: see the key's help (one default, README)
    assert cfg.get_target_quant_model is True and cfg.target_metric == 0.45


@pytest.mark.parametrize("text, closest", [
    ("modle_dir: a.onnx\n", "model_dir"),
    ("val_anno: x.json\n", "val_anno_path"),
    ("skip_tensors: null\n", "skip_tensor_list"),
    ("PTQ:\n  hist_percentile: 0.99\n", "hist_percent"),
])
def test_unknown_key_names_the_closest_valid_key(tmp_path, text, closest):
    with pytest.raises(ConfigError, match=f"did you mean '{closest}'"):
        load_config(write(tmp_path, text))


def test_string_none_reads_as_null_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="yoloquant"):
        cfg = load_config(write(tmp_path, "model_dir: m.onnx\nskip_tensor_list: None\n"
                                          "target_metric: None\n"))
    assert cfg.skip_tensor_list is None and cfg.target_metric is None
    warnings = [r for r in caplog.records if "reading it as null" in r.getMessage()]
    assert len(warnings) == 2 and "skip_tensor_list" in warnings[0].getMessage()


@pytest.mark.parametrize("text, message", [
    ("get_target_quant_model: 'False'\n", "must be true or false"),
    ("PTQ:\n  batch_nums: ten\n", "must be an integer"),
    ("PTQ:\n  algo: kl-fast\n", "choose one of KL, hist"),
    ("arch: YOLOv9\n", "choose one of YOLOv5"),
    ("input_size: [640]\n", r"\[height, width\]"),
    ("target_metric: 42.4\n", "fraction"),
    ("target_metric: 0.3\ntarget_drop: 1.0\n", "not both"),
    ("target_drop: 150\n", "points below float"),
    ("model_dir: ${NO_SUCH_VARIABLE_X}/m.onnx\n", "unset environment variable"),
])
def test_bad_values_are_rejected_with_a_reason(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_algo_names_are_case_insensitive(tmp_path):
    assert load_config(write(tmp_path, "PTQ:\n  algo: kl\n")).PTQ.algo == "KL"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [unclosed\n"))


def test_assets_variable_expands(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "assets"))
    cfg = load_config(write(tmp_path, "model_dir: ${YOLOQUANT_ASSETS}/models/m.onnx\n"))
    assert cfg.model_dir == str(tmp_path / "assets" / "models" / "m.onnx")


def test_require_names_the_missing_key(tmp_path):
    cfg = load_config(write(tmp_path, "arch: YOLOv5\n"))
    with pytest.raises(ConfigError, match="model_dir must be set"):
        require(cfg, "model_dir")


def test_reference_table_documents_every_key():
    table = reference_table()
    for name in Config.__dataclass_fields__:
        if name not in ("config_path", "PTQ"):
            assert f"`{name}`" in table
    assert "`PTQ.hist_percent`" in table


def test_readme_key_table_is_current():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("<!-- keys -->\n", 1)[1].split("<!-- /keys -->", 1)[0].strip()
    assert table == reference_table().strip()


def test_gptq_and_bias_correction_are_exclusive():
    from yoloquant.config import config_from_dict

    assert config_from_dict({"weight_rounding": "gptq"}).weight_rounding == "gptq"
    assert config_from_dict({}).weight_rounding == "nearest"
    with pytest.raises(ConfigError, match="weight_rounding: nearest, or conv_bias_correction: false"):
        config_from_dict({"weight_rounding": "gptq", "conv_bias_correction": True})
    with pytest.raises(ConfigError, match="choose one of nearest, gptq"):
        config_from_dict({"weight_rounding": "adaround"})


def test_max_float_conv_fraction_must_be_a_fraction():
    from yoloquant.config import config_from_dict

    assert config_from_dict({}).max_float_conv_fraction is None
    assert config_from_dict({"max_float_conv_fraction": 0.1}).max_float_conv_fraction == 0.1
    with pytest.raises(ConfigError, match="max_float_conv_fraction must be in \\[0, 1\\]"):
        config_from_dict({"max_float_conv_fraction": 10})
