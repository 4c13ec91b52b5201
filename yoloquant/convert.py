"""Cached ONNX -> Paddle inference-model conversion (X2Paddle) with a numeric check.

Flow: hash the ONNX bytes -> cache hit? return it. Otherwise normalize the graph
(``yoloquant.onnx_normalize``), list ops X2Paddle cannot map (clear error before any work),
run ``x2paddle.convert.onnx2paddle`` in a child process, optionally compare one real image
through ONNX Runtime (original ONNX) and Paddle Inference (FP32, no oneDNN), and move the
finished entry into the cache atomically.

X2Paddle runs in a child process because, in-process, it calls ``exit(0)`` on some export
failures, puts its output folder on ``sys.path`` and imports the generated ``x2paddle_code``
module, flips Paddle to dynamic mode, and writes C++ logs straight to file descriptor 2.

Cache layout: ``<cache_dir>/<sha256 of the ONNX>-x2paddle<version>-v<format>/`` holding
``model.pdmodel``, ``model.pdiparams``, ``normalized.onnx``, ``x2paddle_code.py``,
``convert.log`` and ``meta.json``. The default cache_dir is ``$YOLOQUANT_CACHE``, or
``<repo>/cache/x2paddle`` when the variable is unset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from yoloquant.assets import REPO_ROOT
from yoloquant.errors import ModelError
from yoloquant.onnx_normalize import describe_io, load_onnx, normalize

log = logging.getLogger("yoloquant")

CACHE_ENV_VAR = "YOLOQUANT_CACHE"
# Bump when normalize()/the entry layout changes, so stale conversions are not reused.
CACHE_FORMAT = 2  # 2: fold_constant_subgraphs
X2PADDLE_TIMEOUT_S = 1800
_STALE_TMP_S = 3600  # a .tmp-* folder older than this belongs to a killed run
_META = "meta.json"


@dataclass(frozen=True)
class ConvertedModel:
    model_file: Path
    params_file: Path
    model_dir: Path
    onnx_input_name: str
    paddle_input_name: str
    input_shape: tuple
    output_names: tuple  # ONNX output names, in the order Paddle fetches them
    normalize_counts: dict
    max_abs_diff: float | None
    sha256: str
    paddle_output_names: tuple = field(default=())


# ----------------------------------------------------------------------------- public API
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    return (Path(env) if env else REPO_ROOT / "cache" / "x2paddle").resolve()


def convert_onnx_to_paddle(onnx_path, cache_dir=None, verify_image=None,
                           tolerance: float = 1e-3, input_shape=None) -> ConvertedModel:
    """Convert an ONNX detector to a Paddle inference model, reusing a cached conversion.

    ``verify_image``: a picture path (resized to the input size, RGB, scaled to 0..1) or a
    ready input array; when given, every output of the Paddle model is compared with ONNX
    Runtime on the original ONNX. The check passes when ``|paddle - onnx| <= tolerance *
    max(1, |onnx|)`` element-wise: absolute for small values, relative for large ones such as
    box coordinates in pixels, where FP32 summation-order noise alone reaches ~1e-3
    (ONNX Runtime with and without graph optimizations differs that much on YOLOv5n).
    ``max_abs_diff`` in the result is the plain largest absolute difference.

    ``input_shape`` pins dynamic input dimensions (see ``onnx_normalize.normalize``); it is
    part of the cache key.
    """
    onnx_path = Path(onnx_path)
    cache_dir = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model not found: {onnx_path}; set model_dir in the config")
    sha = _sha256(onnx_path)
    x2p_version = _x2paddle_version()
    key = f"{sha}-x2paddle{x2p_version}-v{CACHE_FORMAT}"
    if input_shape is not None:
        key += "-" + "x".join(str(int(d)) for d in input_shape)
    entry = cache_dir / key

    cached = _load_entry(entry)
    if cached is not None:
        log.info("x2paddle cache hit for %s: %s", onnx_path.name, entry)
        if verify_image is not None:
            cached = _verify_cached(cached, entry, onnx_path, verify_image, tolerance)
        return cached

    t0 = time.perf_counter()
    log.info("converting %s (sha256 %s...) with x2paddle %s", onnx_path.name, sha[:12],
             x2p_version)
    model = load_onnx(onnx_path)
    normalized, counts = normalize(model, input_shape=input_shape)
    unsupported = unsupported_ops(normalized)
    if unsupported:
        raise ModelError(_unsupported_message(onnx_path, unsupported))
    in_name, in_shape, out_names, _ = describe_io(normalized)

    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:12]}-", dir=cache_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published entry may be shared
    try:
        onnx.save(normalized, str(tmp / "normalized.onnx"))
        _run_x2paddle(tmp / "normalized.onnx", tmp / "x2paddle_out", tmp / "convert.log",
                      normalized, keep_log_as=cache_dir / f"failed-{sha[:16]}.log")
        _collect_outputs(tmp)
        feeds, fetches = read_feed_fetch(tmp / "model.pdmodel")
        if len(feeds) != 1 or len(fetches) != len(out_names):
            raise ModelError(f"x2paddle produced {len(feeds)} inputs / {len(fetches)} outputs for "
                             f"{onnx_path}, expected 1 / {len(out_names)}; the conversion is "
                             "unusable")
        log.info("x2paddle finished in %.1f s", time.perf_counter() - t0)

        max_abs = max_scaled = None
        verified_on = None
        if verify_image is not None:
            x = _verify_input(verify_image, in_shape)
            max_abs, max_scaled = _compare(onnx_path, in_name, tmp / "model.pdmodel",
                                           tmp / "model.pdiparams", feeds[0], x, out_names,
                                           tolerance)
            verified_on = _describe_source(verify_image)
        meta = {
            "sha256": sha, "x2paddle_version": x2p_version,
            "cache_format": CACHE_FORMAT, "source": str(onnx_path.resolve()),
            "onnx_input_name": in_name, "paddle_input_name": feeds[0],
            "input_shape": list(in_shape), "output_names": list(out_names),
            "paddle_output_names": list(fetches), "normalize_counts": counts,
            "max_abs_diff": max_abs, "max_scaled_diff": max_scaled, "verified_on": verified_on,
            "conversion_seconds": round(time.perf_counter() - t0, 2),
        }
        _write_json(tmp / _META, meta)
        _publish(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    result = _load_entry(entry)
    if result is None:  # only if someone deleted it between rename and here
        raise ModelError(f"conversion cache entry {entry} vanished after it was written; "
                         "check that nothing else cleans the cache folder")
    log.info("converted %s in %.1f s -> %s", onnx_path.name, time.perf_counter() - t0, entry)
    return result


def read_feed_fetch(model_file) -> tuple[list[str], list[str]]:
    """Feed and fetch variable names of a saved Paddle program, in column order."""
    from paddle.base.proto import framework_pb2

    prog = framework_pb2.ProgramDesc()
    try:
        prog.ParseFromString(Path(model_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read Paddle program {model_file}: {exc}") from exc
    feeds, fetches = {}, {}
    for op in prog.blocks[0].ops:
        if op.type not in ("feed", "fetch"):
            continue
        col = next((a.i for a in op.attrs if a.name == "col"), 0)
        if op.type == "feed":
            feeds[col] = next(v.arguments[0] for v in op.outputs if v.parameter == "Out")
        else:
            fetches[col] = next(v.arguments[0] for v in op.inputs if v.parameter == "X")
    return [feeds[i] for i in sorted(feeds)], [fetches[i] for i in sorted(fetches)]


def unsupported_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """ONNX op types X2Paddle has no mapping for, each with the names of the nodes using it."""
    from x2paddle.op_mapper.onnx2paddle import onnx_op_mapper

    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 9)
    # Same choice as ONNXOpMapper.create_opset: 7..15 as is, older -> 9, newer -> 15.
    version = opset if 7 <= opset <= 15 else (9 if opset < 9 else 15)
    cls = getattr(onnx_op_mapper, f"OpSet{version}")
    # The op tables are filled in __init__, which only stores the decoder's graph.
    mapper = cls(types.SimpleNamespace(graph=None), None)
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        op = node.op_type
        if op == "Dropout":  # x2paddle drops it before mapping
            continue
        if not hasattr(mapper, op) and op not in mapper.directly_map_ops \
                and op not in mapper.elementwise_ops:
            found.setdefault(op, []).append(node.name or node.output[0])
    return found


# ----------------------------------------------------------------------------- x2paddle run
_WORKER = r"""
import json, sys, traceback
model_path, save_dir, result_path = sys.argv[1:4]
result = {"ok": False}
try:
    from x2paddle.convert import onnx2paddle
    onnx2paddle(model_path, save_dir, disable_feedback=True)
    result["ok"] = True
except BaseException as exc:  # x2paddle may call exit(); report whatever stopped it
    result["error"] = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        result["cause"] = f"{type(cause).__name__}: {cause}"
    result["traceback"] = traceback.format_exc()
    traceback.print_exc()  # into the log the user is pointed to
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def _run_x2paddle(model_path: Path, save_dir: Path, log_path: Path,
                  normalized: onnx.ModelProto, keep_log_as: Path) -> None:
    """Run onnx2paddle in a child process; raise ModelError naming what failed.

    On failure the log is copied to ``keep_log_as`` (the work folder is deleted afterwards).
    """
    result_path = save_dir.parent / "x2paddle_result.json"
    env = dict(os.environ)
    env.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ info lines add nothing here
    cmd = [sys.executable, "-c", _WORKER, str(model_path), str(save_dir), str(result_path)]
    with open(log_path, "wb") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  timeout=X2PADDLE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            shutil.copyfile(log_path, keep_log_as)
            raise ModelError(f"x2paddle did not finish within {X2PADDLE_TIMEOUT_S} s; "
                             f"see {keep_log_as}") from exc
    text = log_path.read_text(errors="replace")
    if "Incomplete symbolic shape inference" in text:
        log.warning("x2paddle reported incomplete shape inference; the conversion may be wrong "
                    "(see %s)", log_path)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"ok": False, "error": f"x2paddle process exited with code {proc.returncode} "
                                        "without a result (crashed?)"}
    model_file = save_dir / "inference_model" / "model.pdmodel"
    if result.get("ok") and model_file.is_file():
        return
    shutil.copyfile(log_path, keep_log_as)
    raise ModelError(_failure_message(result, text, normalized, keep_log_as))


def _failure_message(result: dict, text: str, normalized: onnx.ModelProto,
                     log_path: Path) -> str:
    error = result.get("error") or "x2paddle wrote no model (it stops silently on some errors)"
    m = re.search(r"convert failed node:(\S+?), op_type is (\w+)", error)
    if m:
        node = _original_node_name(normalized, m.group(1)) or m.group(1)
        cause = f" ({result['cause']})" if result.get("cause") else ""
        return (f"x2paddle could not convert node '{node}' of op type {m.group(2)}{cause}. "
                f"This op form is not supported by x2paddle; re-export the model with a "
                f"different opset or simplify it (onnxsim). Full log: {log_path}")
    tail = "\n".join(l for l in text.splitlines()[-15:] if l.strip())
    return f"x2paddle failed: {error}. Last log lines:\n{tail}\nFull log: {log_path}"


def _original_node_name(model: onnx.ModelProto, x2p_name: str) -> str | None:
    # x2paddle names a node after its first output, with these characters replaced by '_'.
    for node in model.graph.node:
        if node.output:
            name = node.output[0]
            if "::" in name and len(node.output) > 1:
                name = name.replace("::", "_")
            if ":" in name and len(node.output) > 1 and node.op_type != "LSTM":
                name = name.split(":")[0]
            for ch in " .*?\\/-:;":
                name = name.replace(ch, "_")
            if name == x2p_name:
                return node.name or node.output[0]
    return None


def _unsupported_message(onnx_path: Path, unsupported: dict[str, list[str]]) -> str:
    parts = []
    for op, nodes in sorted(unsupported.items()):
        shown = ", ".join(nodes[:5]) + (f" (+{len(nodes) - 5} more)" if len(nodes) > 5 else "")
        parts.append(f"{op} (nodes: {shown})")
    return (f"x2paddle cannot convert {onnx_path}: unsupported ONNX op type(s) "
            f"{'; '.join(parts)}. Re-export the model without them (e.g. export without NMS / "
            "post-processing) or with another opset")


def _collect_outputs(tmp: Path) -> None:
    """Keep the inference model and the generated code; drop the duplicate dygraph params."""
    out = tmp / "x2paddle_out"
    for name in ("model.pdmodel", "model.pdiparams"):
        os.replace(out / "inference_model" / name, tmp / name)
    if (out / "x2paddle_code.py").is_file():
        os.replace(out / "x2paddle_code.py", tmp / "x2paddle_code.py")
    shutil.rmtree(out, ignore_errors=True)
    (tmp / "x2paddle_result.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- cache
def _x2paddle_version() -> str:
    # From the package metadata: importing x2paddle would import paddle, slow for a cache hit.
    try:
        return importlib.metadata.version("x2paddle")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError("x2paddle is not installed; install the pinned requirements "
                         "(pip install -r requirements.txt)") from exc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _load_entry(entry: Path) -> ConvertedModel | None:
    """Read a cache entry; None when absent or incomplete (then it is removed)."""
    meta_path = entry / _META
    if not entry.is_dir():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        result = ConvertedModel(
            model_file=entry / "model.pdmodel", params_file=entry / "model.pdiparams",
            model_dir=entry, onnx_input_name=meta["onnx_input_name"],
            paddle_input_name=meta["paddle_input_name"],
            input_shape=tuple(meta["input_shape"]), output_names=tuple(meta["output_names"]),
            normalize_counts=dict(meta["normalize_counts"]),
            max_abs_diff=meta.get("max_abs_diff"), sha256=meta["sha256"],
            paddle_output_names=tuple(meta.get("paddle_output_names", ())))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring broken x2paddle cache entry %s (%s); converting again", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    if not (result.model_file.is_file() and result.params_file.is_file()):
        log.warning("ignoring incomplete x2paddle cache entry %s; converting again", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return result


def _publish(tmp: Path, entry: Path) -> None:
    try:
        os.rename(tmp, entry)  # atomic on one file system: readers see all or nothing
    except OSError:
        if (entry / _META).is_file():
            log.info("another process finished the same conversion first; using its entry")
            return
        raise


def _clean_stale_tmp(cache_dir: Path) -> None:
    now = time.time()
    for p in cache_dir.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            continue  # removed by a concurrent run


def _verify_cached(cached: ConvertedModel, entry: Path, onnx_path: Path, verify_image,
                   tolerance: float) -> ConvertedModel:
    """Cache hits reuse the stored check; only an entry never checked is checked now."""
    meta = json.loads((entry / _META).read_text())
    if meta.get("max_scaled_diff") is not None:
        if meta["max_scaled_diff"] > tolerance:
            raise ModelError(f"converted model in cache {entry} differs from ONNX by "
                             f"{meta['max_abs_diff']:.3g} (scaled {meta['max_scaled_diff']:.3g}), "
                             f"above tolerance {tolerance}")
        return cached
    x = _verify_input(verify_image, cached.input_shape)
    max_abs, max_scaled = _compare(onnx_path, cached.onnx_input_name, cached.model_file,
                                   cached.params_file, cached.paddle_input_name, x,
                                   list(cached.output_names), tolerance)
    meta.update(max_abs_diff=max_abs, max_scaled_diff=max_scaled,
                verified_on=_describe_source(verify_image))
    _write_json(entry / _META, meta)
    return dataclasses.replace(cached, max_abs_diff=max_abs)


# ----------------------------------------------------------------------------- verification
def _describe_source(verify_image) -> str:
    if isinstance(verify_image, np.ndarray):
        return f"array{list(verify_image.shape)}"
    return str(verify_image)


def _verify_input(verify_image, input_shape) -> np.ndarray:
    """A realistic NCHW float32 tensor: a picture resized (no letterbox), RGB, 0..1."""
    shape = tuple(int(d) for d in input_shape)
    if isinstance(verify_image, np.ndarray):
        x = np.asarray(verify_image, dtype=np.float32)
        if x.ndim == len(shape) - 1:
            x = x[None]
        if x.shape != shape:
            raise ModelError(f"verify_image array has shape {list(verify_image.shape)}, the "
                             f"model expects {list(shape)}; pass a matching array or an image path")
        return np.ascontiguousarray(x)
    import cv2

    path = Path(verify_image)
    img = cv2.imread(str(path)) if path.is_file() else None
    if img is None:
        raise ModelError(f"verify image not found or unreadable: {path}; pass a .jpg/.png path")
    if len(shape) != 4 or shape[1] != 3:
        raise ModelError(f"cannot build an image tensor for input shape {list(shape)}; "
                         "pass verify_image as a ready array instead")
    img = cv2.resize(img, (shape[3], shape[2]), interpolation=cv2.INTER_LINEAR)
    x = img[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0
    return np.ascontiguousarray(np.repeat(x[None], shape[0], axis=0))


def _compare(onnx_path, onnx_input, model_file, params_file, paddle_input, x, output_names,
             tolerance) -> tuple[float, float]:
    import onnxruntime as ort
    from paddle import inference as paddle_infer

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(list(output_names), {onnx_input: x})

    # Plain FP32 without oneDNN or IR fusions: we want the converted program as written.
    config = paddle_infer.Config(str(model_file), str(params_file))
    config.disable_gpu()
    config.disable_mkldnn()
    config.switch_ir_optim(False)
    config.disable_glog_info()
    predictor = paddle_infer.create_predictor(config)
    handle = predictor.get_input_handle(paddle_input)
    handle.reshape(list(x.shape))
    handle.copy_from_cpu(x)
    predictor.run()
    got = [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]

    worst_abs, worst_scaled = 0.0, 0.0
    for name, a, b in zip(output_names, ref, got):
        if a.shape != b.shape:
            raise ModelError(f"converted model output {name} has shape {list(b.shape)}, ONNX "
                             f"gives {list(a.shape)}; the conversion is wrong")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scaled = diff / np.maximum(1.0, np.abs(a.astype(np.float64)))
        d_abs = float(np.nanmax(diff)) if diff.size else 0.0
        d_scaled = float(np.nanmax(scaled)) if scaled.size else 0.0
        if np.isnan(diff).any():
            d_abs = d_scaled = float("inf")
        log.info("verify %s: max abs diff %.3g (scaled %.3g)", name, d_abs, d_scaled)
        if d_scaled > tolerance:
            raise ModelError(f"converted model differs from ONNX by {d_abs:.3g} on output {name} "
                             f"(|diff| / max(1, |onnx|) = {d_scaled:.3g} > tolerance {tolerance})")
        worst_abs, worst_scaled = max(worst_abs, d_abs), max(worst_scaled, d_scaled)
    return worst_abs, worst_scaled
