"""Inference backends behind one small interface: `backend(images) -> first output`.

Every backend is scored by the same validator (yoloquant.validator), so a float ONNX model, its
Paddle conversion and the INT8 artifacts are compared under one protocol.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from .errors import ConfigError, ModelError, RuntimeDefectError
from .stats import snr_db

log = logging.getLogger("yoloquant")
# Paddle's C++ passes log every fusion step at INFO; keep warnings and errors only
os.environ.setdefault("GLOG_minloglevel", "2")

# Paddle Inference's oneDNN int8 pass quantizes every op it can unless told otherwise; on YOLO
# heads that destroys the box/score concat (measured: mAP 0.000), so int8 runs are limited to convs.
INT8_OP_TYPES = ("conv2d", "depthwise_conv2d")


def default_threads() -> int:
    return int(os.environ.get("YOLOQUANT_THREADS", os.cpu_count() or 1))


class Backend(Protocol):
    name: str  # e.g. "onnxruntime", "paddle-inference(onednn-int8)"
    input_shape: tuple

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeBackend:
    """Runs an .onnx file with ONNX Runtime on the CPU."""

    def __init__(self, onnx_path: str | Path, threads: Optional[int] = None):
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise ModelError(f"ONNX model not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several private exception types for bad files
            raise ModelError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)
        self.output_name = self.session.get_outputs()[0].name
        self.name = "onnxruntime"
        self.path = path

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    @classmethod
    def from_model(cls, model, threads: Optional[int] = None,
                   name: str = "onnxruntime") -> "OnnxRuntimeBackend":
        """A backend for an in-memory onnx.ModelProto (e.g. a QDQ variant that is never saved)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.log_severity_level = 3
        self = cls.__new__(cls)
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several private exception types for bad models
            raise ModelError(f"ONNX Runtime cannot load the in-memory model {model.graph.name!r}: "
                             f"{exc}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)
        self.output_name = self.session.get_outputs()[0].name
        self.name = name
        self.path = None
        return self


OPENVINO_PIN = "openvino==2026.4.1"  # the version requirements.txt pins (numpy 1.x works)


def require_openvino():
    """The openvino module, or one line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ConfigError(f"OpenVINO is not installed: pip install {OPENVINO_PIN} "
                          "(it is in requirements.txt)") from None
    return openvino


class OpenVinoBackend:
    """OpenVINO's CPU plugin on an .onnx file (it runs QDQ ONNX in int8) or an IR .xml.

    Latency mode, one stream; layers left float run in f32: on CPUs with bf16 or AMX support
    OpenVINO would otherwise run them in bf16, a different (lossy) artifact."""

    def __init__(self, path: str | Path, threads: Optional[int] = None, precision: str = "f32"):
        ov = require_openvino()
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model not found: {path}")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                "INFERENCE_NUM_THREADS": str(threads or default_threads()),
                "INFERENCE_PRECISION_HINT": precision})
        except RuntimeError as exc:  # OpenVINO reports unreadable / unsupported models so
            raise ModelError(f"OpenVINO cannot load {path}: {str(exc).splitlines()[0]}") from exc
        self.request = self.compiled.create_infer_request()
        self.input_shape = tuple(model.inputs[0].get_partial_shape().to_shape())
        self.name = "openvino"
        self.path = path
        if path.suffix == ".onnx":
            check_signed_activations(self, path)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()

    def int8_convs(self) -> tuple[int, int]:
        """(convolutions executed in u8/i8, all convolutions) of the compiled graph."""
        total = int8 = 0
        for info in self.layer_info():
            if info["type"] == "Convolution":
                total += 1
                int8 += info["precision"] in ("u8", "i8")
        return int8, total

    def layer_info(self) -> list[dict]:
        """Per layer of the compiled graph: type, the precision it computes in, and kernel."""
        rows = []
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info:
                continue
            rows.append({"name": op.get_friendly_name(), "type": info["layerType"].astype(str),
                         "precision": info["runtimePrecision"].astype(str).lower(),
                         "kernel": info["primitiveType"].astype(str) if "primitiveType" in info else ""})
        return rows


@dataclass(frozen=True)
class PaddleModelFiles:
    model_file: Path
    params_file: Path

    @classmethod
    def find(cls, model_dir: str | Path) -> "PaddleModelFiles":
        """The .pdmodel/.pdiparams pair in a Paddle inference model folder."""
        d = Path(model_dir)
        models = sorted(d.glob("*.pdmodel"))
        if len(models) != 1:
            raise ModelError(f"{d} must hold exactly one .pdmodel file (found {len(models)}); "
                             f"pass a Paddle inference model folder or an .onnx file")
        params = models[0].with_suffix(".pdiparams")
        if not params.is_file():
            raise ModelError(f"{params} is missing beside {models[0]}")
        return cls(models[0], params)


class PaddleInferenceBackend:
    """Paddle Inference on the CPU: float (oneDNN) or real int8 (oneDNN int8 on the conv ops)."""

    def __init__(self, files: PaddleModelFiles, int8: bool = False, mkldnn: bool = True,
                 threads: Optional[int] = None):
        from paddle import inference

        config = inference.Config(str(files.model_file), str(files.params_file))
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or default_threads())
        config.disable_glog_info()
        config.switch_ir_optim(True)
        if mkldnn or int8:
            config.enable_mkldnn()
        if int8:
            config.enable_mkldnn_int8(set(INT8_OP_TYPES))
        try:
            with _quiet_native_output():  # the oneDNN int8 passes print every fusion to stdout
                self.predictor = inference.create_predictor(config)
        except Exception as exc:  # paddle raises its own enforce errors for unreadable programs
            raise ModelError(f"Paddle Inference cannot load {files.model_file}: {exc}") from exc
        self.input_name = self.predictor.get_input_names()[0]
        self.input_handle = self.predictor.get_input_handle(self.input_name)
        self.output_handle = self.predictor.get_output_handle(self.predictor.get_output_names()[0])
        # the handle reports [0] until reshaped: read the declared shape from the program
        self.input_shape = _feed_shape(files.model_file, self.input_name)
        kind = "onednn-int8" if int8 else ("onednn-fp32" if mkldnn else "fp32")
        self.name = f"paddle-inference({kind})"
        self.files = files

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.input_handle.reshape(list(images.shape))
        self.input_handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return self.output_handle.copy_to_cpu()


@contextlib.contextmanager
def _quiet_native_output():
    """Silence C++ writes to stdout/stderr (fds 1 and 2), which redirect_stdout cannot catch.

    What was written is kept and attached to the error if the block fails.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        except Exception as exc:
            sink.seek(0)
            exc.add_note(sink.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _feed_shape(model_file: Path, name: str) -> tuple:
    # read the protobuf directly: Program.parse_from_string fails on some quantized programs
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(Path(model_file).read_bytes())
    for var in desc.blocks[0].vars:
        if var.name == name:
            return tuple(int(v) if v > 0 else None for v in var.type.lod_tensor.tensor.dims)
    raise ModelError(f"{model_file} declares no input variable {name!r}")


def open_backend(path: str | Path, int8: bool = False, threads: Optional[int] = None) -> Backend:
    """An .onnx file runs on ONNX Runtime; a folder with a .pdmodel runs on Paddle Inference."""
    p = Path(path)
    if p.suffix == ".onnx" or p.is_file():
        return OnnxRuntimeBackend(p, threads=threads)
    if p.is_dir():
        return PaddleInferenceBackend(PaddleModelFiles.find(p), int8=int8, threads=threads)
    raise ModelError(f"model not found: {p} (give an .onnx file or a Paddle inference model folder)")


def session_with_outputs(model, names: list[str]):
    """CPU ONNX Runtime session of `model` (an onnx.ModelProto) that also returns the tensors
    `names` (intermediate ones included)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# OpenVINO 2026.4.1 on AMD EPYC CPUs (family/model 26/2 and 25/17 seen) computes garbage from QDQ
# ONNX with signed int8 activations (our tensorrt layout, NNCF's ONNX route): yolov5n mAP 0.03
# instead of 0.30; tests/test_qdq_placement.py's glue graph -0.9 dB against 29 dB for uint8. On a
# Xeon with AMX the same files ran correctly. So the check is a measurement, not a CPU list.
SIGNED_CHECK_MIN_SNR_DB = 15.0


def signed_int8_activations(model) -> bool:
    """Whether a QuantizeLinear of the graph (activations: weights are stored quantized) has a
    signed int8 zero point."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is not None and zp.data_type == TensorProto.INT8:
                return True
    return False


def median_channel_snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """SNR of `got` against `ref`, per channel of the output's shortest non-batch axis (a
    detector's 85 box/score features), median over channels. The SNR of the whole tensor is
    ruled by the box coordinates (hundreds of pixels): yolov5n's tensorrt layout on OpenVINO on
    an EPYC 25/17 scored 20 dB on it with every score channel garbage (median -0.8 dB; a correct
    uint8 model 23-25 dB)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.ndim < 2:
        ref, got = ref.reshape(1, -1), got.reshape(1, -1)
    channel = 1 + int(np.argmin(ref.shape[1:]))
    others = tuple(a for a in range(ref.ndim) if a != channel)
    nsr = np.mean((ref - got) ** 2, axis=others) / np.maximum(np.mean(ref ** 2, axis=others), 1e-300)
    return float(np.median(snr_db(nsr)))


def check_signed_activations(backend, path: Path, seed: int = 0) -> None:
    """Refuse (RuntimeDefectError) a signed-int8-activation model that OpenVINO computes wrongly
    here: its output on one fixed random input against ONNX Runtime's, which runs QDQ exactly."""
    import onnx

    model = onnx.load(str(path))
    if not signed_int8_activations(model):
        return
    x = np.random.default_rng(seed).random(backend.input_shape, dtype=np.float32)
    ref = OnnxRuntimeBackend(path, threads=1)(x)
    got = backend(x)
    snr = median_channel_snr_db(ref, got)
    if snr < SIGNED_CHECK_MIN_SNR_DB:
        raise RuntimeDefectError(
            f"OpenVINO computes {path.name} wrongly on this CPU: the model has signed int8 "
            f"activations and its output on a test input is {snr:.1f} dB from ONNX Runtime's "
            f"(median over output channels; >= {SIGNED_CHECK_MIN_SNR_DB:.0f} dB expected; an "
            "OpenVINO 2026.4.1 defect seen on AMD EPYC CPUs). For OpenVINO use a model saved with "
            "deploy_backend: openvino (uint8 activations); a tensorrt-layout model is for TensorRT")
