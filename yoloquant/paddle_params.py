"""Reading and editing the parameters of Paddle programs: conv biases, static mode, saved models.

Used by the calibration (bias correction inside the PTQ) and after it (fine_tune.py's learned
rounding and bias shifts go into the saved Paddle int8 model).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Dict, Sequence, Union

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


def add_to_paddle_params(model_file: Union[str, os.PathLike], deltas: Dict[str, np.ndarray]) -> None:
    """Add `deltas` (parameter name -> values of its size) to the parameters of a saved Paddle
    inference model, rewriting its .pdiparams in place."""
    with edited_inference_model(model_file) as (_, scope):
        for name, delta in deltas.items():
            add_to_param(scope, name, delta, paddle.CPUPlace())
