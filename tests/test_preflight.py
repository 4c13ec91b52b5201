"""preflight: every input a job needs, checked in about a second, before Paddle is imported."""
import subprocess
import sys

import pytest

from yoloquant.assets import assets_dir, missing_hint
from yoloquant.config import config_from_dict
from yoloquant.errors import ConfigError, DataError, ModelError
from yoloquant.fileio import check_writable
from yoloquant.preflight import check_job, check_model

from tiny_job import ROOT, conv_relu_onnx, make_job, relu_onnx


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("preflight")
    return yaml.safe_load(make_job(root).read_text())


def test_a_good_job_passes_and_reports_the_model(raw, tmp_path):
    facts = check_job(config_from_dict(raw), evaluate=True, save_dir=tmp_path / "new" / "out")
    assert facts.input_shape == (1, 3, 64, 64) and facts.output_shape == (1, 256, 7)
    assert facts.convs == 3
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.parametrize("maker", [relu_onnx, conv_relu_onnx])
def test_models_that_are_not_detectors(raw, tmp_path, maker):
    path = tmp_path / "m.onnx"
    maker(path)
    with pytest.raises(ModelError, match="is not a YOLOv5 detector.*outputs 3-D"):
        check_model(path, "YOLOv5", "yolov5")
    with pytest.raises(ModelError, match="not a YOLOX detector"):
        check_job(config_from_dict(dict(raw, model_dir=str(path), arch="YOLOX")))


def test_yolov5_head_declared_as_yolox_is_refused(raw):
    # the tiny head has 256 rows; a YOLOX head on 64x64 has 84
    with pytest.raises(ModelError, match="YOLOX head on a 64x64 input"):
        check_job(config_from_dict(dict(raw, arch="YOLOX")), calibrate=False)


def test_each_input_is_checked(raw, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        check_job(config_from_dict(dict(raw, train_image_dir=str(tmp_path / "empty"),
                                        train_anno_path=None)))
    with pytest.raises(DataError, match="annotation file .* does not exist"):
        check_job(config_from_dict(dict(raw, val_anno_path=str(tmp_path / "x.json"))),
                  evaluate=True)
    check_job(config_from_dict(dict(raw, val_anno_path=str(tmp_path / "x.json"))))  # not needed
    with pytest.raises(ConfigError, match="val_image_dir, val_anno_path must be set"):
        check_job(config_from_dict(dict(raw, val_image_dir=None, val_anno_path=None)),
                  evaluate=True)


def test_save_dir_checks_create_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        check_writable(tmp_path / "file")
    with pytest.raises(ConfigError, match="not writable"):
        check_writable("/proc/yoloquant-out")  # not even root can create folders there


def test_a_missing_asset_path_names_the_variable(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLOQUANT_ASSETS", str(tmp_path / "assets"))
    cfg = config_from_dict(dict(raw, model_dir="${YOLOQUANT_ASSETS}/models/gone.onnx"))
    with pytest.raises(ModelError, match="gone.onnx.*YOLOQUANT_ASSETS=.*assets.*set YOLOQUANT_ASSETS"):
        check_job(cfg)
    cfg = config_from_dict(dict(raw, val_image_dir="${YOLOQUANT_ASSETS}/coco/val2017_mini/images"))
    with pytest.raises(DataError, match="val2017_mini/images does not exist.*YOLOQUANT_ASSETS"):
        check_job(cfg, evaluate=True)
    monkeypatch.delenv("YOLOQUANT_ASSETS")
    assert "YOLOQUANT_ASSETS is unset" in missing_hint(assets_dir() / "nope.onnx")
    assert missing_hint(tmp_path / "nope.onnx") == ""  # elsewhere: the ordinary message


def test_preflight_does_not_import_paddle(raw, tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    code = ("import sys\nfrom yoloquant.config import load_config\n"
            "from yoloquant.preflight import check_job\n"
            f"check_job(load_config({str(cfg)!r}), evaluate=True, save_dir={str(tmp_path / 'o')!r})\n"
            "assert 'paddle' not in sys.modules, 'paddle was imported'\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
