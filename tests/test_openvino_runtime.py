"""OpenVINO as a runtime of the QDQ ONNX: the backend, and the one-line message when it is absent."""
import builtins
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from yoloquant.errors import ConfigError
from yoloquant.runtime import OPENVINO_PIN, OpenVinoBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_openvino(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_openvino_says_how_to_install_it(no_openvino, tmp_path):
    with pytest.raises(ConfigError, match=rf"OpenVINO is not installed: pip install {OPENVINO_PIN}"):
        OpenVinoBackend(tmp_path / "model.onnx")


def test_eval_cli_without_openvino_is_one_error_line(tmp_path):
    # a child interpreter where 'import openvino' fails, running the real eval.py entry point
    code = ("import sys; sys.modules['openvino'] = None; sys.argv = ['eval.py', '--config_path', "
            f"{str(ROOT / 'configs' / 'demo.yaml')!r}, '--runtime', 'openvino']; "
            f"sys.path.insert(0, {str(ROOT)!r}); import runpy; runpy.run_path({str(ROOT / 'eval.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: OpenVINO is not installed: pip install {OPENVINO_PIN} (it is in requirements.txt)"]
    assert "Traceback" not in proc.stderr


def save_one_conv_model(path: Path) -> None:
    """Y = a 1x1 conv of X (1x3x4x4) with every weight 0.5."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((2, 3, 1, 1), 0.5, np.float32), "W")
    graph = helper.make_graph([helper.make_node("Conv", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_openvino_backend_runs_an_onnx_file(tmp_path):
    save_one_conv_model(tmp_path / "m.onnx")
    backend = OpenVinoBackend(tmp_path / "m.onnx", threads=1)
    x = np.random.default_rng(0).random((1, 3, 4, 4), dtype=np.float32)
    np.testing.assert_allclose(backend(x), np.broadcast_to(x.sum(1, keepdims=True) * 0.5, (1, 2, 4, 4)), rtol=1e-5)
    assert backend.input_shape == (1, 3, 4, 4) and backend.int8_convs() == (0, 1)
    with pytest.raises(Exception, match="model not found"):
        OpenVinoBackend(tmp_path / "missing.onnx")


def test_a_runtime_refusing_a_saved_model_leaves_out_its_row_only(tmp_path, monkeypatch, caplog):
    """evaluate_saved / --eval: a runtime that would compute the model wrongly here (e.g. OpenVINO
    on signed int8 activations, runtime.check_signed_activations) gives no row and a warning;
    the other runtimes' rows stay."""
    from yoloquant import evaluate
    from yoloquant.errors import RuntimeDefectError

    save_one_conv_model(tmp_path / "model_int8.onnx")

    def refusing(path, *args, **kwargs):
        raise RuntimeDefectError(f"OpenVINO computes {Path(path).name} wrongly on this CPU")

    monkeypatch.setattr(evaluate, "have_openvino", lambda: True)
    monkeypatch.setattr(evaluate, "OpenVinoBackend", refusing)
    with caplog.at_level("WARNING", logger="yoloquant"):
        rows = list(evaluate.saved_backends(str(tmp_path)))
    assert [backend.name for _, backend in rows] == ["onnxruntime"]
    assert "no INT8 model_int8.onnx row: OpenVINO computes model_int8.onnx wrongly" in caplog.text


def test_saved_backends_without_openvino_never_opens_it(tmp_path, monkeypatch):
    """openvino=False (the tests that assert only on ONNX Runtime and Paddle): no OpenVINO
    model is compiled, though OpenVINO is installed."""
    from yoloquant import evaluate

    save_one_conv_model(tmp_path / "model_int8.onnx")

    def opened(path, *args, **kwargs):
        raise AssertionError(f"OpenVINO opened {path}")

    monkeypatch.setattr(evaluate, "have_openvino", lambda: True)
    monkeypatch.setattr(evaluate, "OpenVinoBackend", opened)
    rows = list(evaluate.saved_backends(str(tmp_path), openvino=False))
    assert [backend.name for _, backend in rows] == ["onnxruntime"]
