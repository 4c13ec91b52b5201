"""Reading and editing the parameters of Paddle programs: conv biases, int8 weights, activation
scales, static mode, saved models.

Used by the calibration (bias correction inside the PTQ) and after it (fine_tune.py's learned
rounding, learned activation thresholds and bias shifts go into the saved Paddle int8 model).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Dict, Optional, Sequence, Union

import numpy as np
import paddle

from .errors import ModelError
from .paddle_output import canonicalize_program_file, fresh_names


def block_conv_bias_params(block, weights: Sequence[str], persistable: set) -> Dict[str, str]:
    """{weight: the bias parameter added to the output of the conv reading it}: X2Paddle writes
    a conv's bias as conv2d -> elementwise_add(out, reshape2(bias)) (or the bias directly).
    Convs in another layout are left out."""
    producers = {name: op for op in block.ops for name in op.output_arg_names}
    readers: Dict[str, list] = {}
    convs = {}
    for op in block.ops:
        for name in set(op.input_arg_names):
            readers.setdefault(name, []).append(op)
            if op.type in ("conv2d", "depthwise_conv2d"):
                convs.setdefault(name, op)
    found = {}
    for weight in weights:
        conv = convs.get(weight)
        if conv is None:
            continue
        out = conv.output("Output")[0]
        after = readers.get(out, [])
        if len(after) != 1 or after[0].type != "elementwise_add" or after[0].input("X") != [out]:
            continue
        y = after[0].input("Y")[0]
        maker = producers.get(y)
        if y in persistable:
            found[weight] = y
        elif maker is not None and maker.type in ("reshape2", "reshape") \
                and maker.input("X")[0] in persistable:
            found[weight] = maker.input("X")[0]
    return found


def add_to_param(scope, name: str, delta, place) -> None:
    """Parameter `name` in `scope` += `delta` (same number of values, any shape)."""
    var = scope.find_var(name)
    if var is None:
        raise ModelError(f"the program has no parameter {name!r}")
    tensor = var.get_tensor()
    value = np.array(tensor)
    delta = np.asarray(delta, value.dtype)
    if delta.size != value.size:
        raise ModelError(f"parameter {name} has {value.size} values, the change {delta.size}")
    tensor.set(value + delta.reshape(value.shape), place)


@contextmanager
def static_mode():
    """Paddle static-graph mode inside the block; the caller's mode (dynamic by default in
    paddle 2.x) is restored after it, also on error."""
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        yield
    finally:
        if was_dynamic:
            paddle.disable_static()


def conv_bias_params(model_file: Union[str, os.PathLike], weights: Sequence[str]) -> Dict[str, str]:
    """{conv weight name: its bias parameter} in a float Paddle inference program (X2Paddle
    layout, see block_conv_bias_params); convs without a bias parameter are left out. The PTQ keeps
    parameter names, so the same names hold in the quantized program."""
    with static_mode(), open(model_file, "rb") as f:
        program = paddle.static.Program.parse_from_string(f.read())
    return block_conv_bias_params(program.global_block(), weights,
                             {v.name for v in program.list_vars() if v.persistable})


def conv_input_scales(program, weights: Sequence[str]) -> Dict[str, str]:
    """{conv weight name: the Scale tensor of its input's quantize/dequantize_linear pair} in an
    onnx_format int8 program (the pair shares it; it holds the threshold, the abs max of the
    int8 grid). A conv whose input is not quantized there is an error."""
    ops = program.global_block().ops
    producer = {out: op for op in ops for out in op.output_arg_names}
    dequantized = {op.input("X")[0]: op.output("Y")[0] for op in ops if op.type == "dequantize_linear"}
    conv_by_filter = {op.input("Filter")[0]: op for op in ops if op.type in ("conv2d", "depthwise_conv2d")}
    out = {}
    for weight in weights:
        conv = conv_by_filter.get(dequantized.get(weight, weight))
        dq = producer.get(conv.input("Input")[0]) if conv is not None else None
        if dq is None or dq.type != "dequantize_linear":
            raise ModelError(f"the Paddle int8 program has no quantized input for the conv of {weight!r} "
                             "(was it saved with onnx_format: true?)")
        out[weight] = dq.input("Scale")[0]
    return out


@contextmanager
def edited_inference_model(model_file: Union[str, os.PathLike]):
    """Load a saved Paddle inference model into a fresh scope, yield (program, scope) for its
    parameters to be changed, and save it back in place when the block ends without error."""
    prefix = os.fspath(model_file)[:-len(".pdmodel")]
    with static_mode():
        scope, exe = paddle.static.Scope(), paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(scope):
            program, feeds, fetches = paddle.static.load_inference_model(prefix, exe)
            yield program, scope
            block = program.global_block()
            with fresh_names():
                paddle.static.save_inference_model(prefix, [block.var(n) for n in feeds], fetches,
                                                   exe, program=program)
    canonicalize_program_file(model_file)


def write_paddle_int8_params(model_file: Union[str, os.PathLike], weights: Optional[dict] = None,
                             act_thresholds: Optional[dict] = None,
                             bias_deltas: Optional[dict] = None) -> tuple[int, int]:
    """Edit a saved onnx_format Paddle int8 program in place, loading and saving it once:
    `weights` {int8 weight name: learned int8 values}, `act_thresholds` {conv weight name: input
    threshold}, `bias_deltas` {parameter name: values added}. Returns (weights written, Scale
    tensors written: readers of one tensor share one). Nothing to write: the file is untouched."""
    if not (weights or act_thresholds or bias_deltas):
        return 0, 0
    with edited_inference_model(model_file) as (prog, scope):
        n_weights = _set_int8_weights(prog, scope, weights or {})
        n_scales = _set_act_thresholds(prog, scope, act_thresholds or {})
        for name, delta in (bias_deltas or {}).items():
            add_to_param(scope, name, delta, paddle.CPUPlace())
    return n_weights, n_scales


def write_paddle_weights(model_file: Union[str, os.PathLike], ints_by_paddle_name: dict[str, np.ndarray]) -> int:
    """Replace the int8 weights of an onnx_format Paddle program with the learned ones."""
    return write_paddle_int8_params(model_file, weights=ints_by_paddle_name)[0]


def _set_int8_weights(prog, scope, ints_by_paddle_name: dict[str, np.ndarray]) -> int:
    # onnx_format programs store weights as int8 tensors read by dequantize_linear
    dq_inputs = {op.input("X")[0] for op in prog.global_block().ops if op.type == "dequantize_linear"}
    for name, q in ints_by_paddle_name.items():
        var = scope.find_var(name)
        if var is None or name not in dq_inputs:
            raise ModelError(f"the Paddle int8 program has no int8 weight {name!r} read by "
                             "dequantize_linear (was it saved with onnx_format: true?)")
        tensor = var.get_tensor()
        old = np.array(tensor)
        if old.shape != q.shape:
            raise ModelError(f"Paddle weight {name} has shape {old.shape}, the learned one {q.shape}")
        tensor.set(q.astype(old.dtype), paddle.CPUPlace())
    return len(ints_by_paddle_name)


def _set_act_thresholds(prog, scope, thresholds_by_weight: dict[str, float]) -> int:
    if not thresholds_by_weight:
        return 0
    scales = conv_input_scales(prog, list(thresholds_by_weight))
    written = {}
    for weight, threshold in thresholds_by_weight.items():
        scale = scales[weight]
        if scale in written and not math.isclose(written[scale], threshold, rel_tol=1e-6):
            raise ModelError(f"internal error: two thresholds learned for one Paddle tensor ({scale})")
        tensor = scope.find_var(scale).get_tensor()
        old = np.array(tensor)
        tensor.set(np.full(old.shape, threshold, dtype=old.dtype), paddle.CPUPlace())
        written[scale] = threshold
    return len(written)
