"""paddle_output: saved programs are deterministic; Paddle's console output stays out of ours."""
import logging
import subprocess
import sys

import numpy as np
import pytest
from paddle.base.proto import framework_pb2

from yoloquant.paddle_output import canonical_program, quiet_ptq
from yoloquant.ptq import PADDLE_MODEL, quantize
from yoloquant.runtime import PaddleInferenceBackend, PaddleModelFiles

from tiny_job import ROOT, make_job


def op(kind, ins, outs, callstack=None):
    o = framework_pb2.OpDesc()
    o.type = kind
    slot = o.inputs.add()
    slot.parameter, slot.arguments[:] = "X", ins
    slot = o.outputs.add()
    slot.parameter, slot.arguments[:] = "Out", outs
    if callstack:
        a = o.attrs.add()
        a.name, a.type = "op_callstack", framework_pb2.AttrType.STRINGS
        a.strings[:] = callstack
    return o


def program(ops) -> bytes:
    desc = framework_pb2.ProgramDesc()
    block = desc.blocks.add()
    block.idx, block.parent_idx = 0, -1
    block.ops.extend(ops)
    return desc.SerializeToString()


def order(data: bytes) -> list:
    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(data)
    return [(o.type, list(o.outputs[0].arguments)) for o in desc.blocks[0].ops]


def test_independent_ops_get_one_order_and_dependencies_are_kept():
    # two branches from x, joined by concat; then an in-place scale on the result
    a = op("relu", ["x"], ["a"])
    b = op("sigmoid", ["x"], ["b"])
    c = op("concat", ["a", "b"], ["c"])
    d = op("scale", ["c"], ["c"])  # in place
    e = op("fetch", ["c"], ["out"])
    one, two = canonical_program(program([a, b, c, d, e])), canonical_program(program([b, a, c, d, e]))
    assert one == two
    got = order(one)
    assert got.index(("relu", ["a"])) < got.index(("concat", ["c"])) < got.index(("scale", ["c"]))
    assert got[-1] == ("fetch", ["out"])
    # a reader of a variable stays before the op that overwrites it
    w = [op("relu", ["x"], ["t"]), op("exp", ["t"], ["u"]), op("scale", ["x"], ["t"]),
         op("sum", ["t", "u"], ["v"])]
    got = order(canonical_program(program(w)))
    assert got.index(("exp", ["u"])) < got.index(("scale", ["t"])) < got.index(("sum", ["v"]))


def test_call_stacks_are_dropped():
    with_stack = program([op("feed", ["feed"], ["x"], callstack=["File a.py, line 1"])])
    other = program([op("feed", ["feed"], ["x"], callstack=["File b.py, line 9"])])
    assert canonical_program(with_stack) == canonical_program(other)
    assert b"a.py" not in canonical_program(with_stack)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("paddle_output")
    return root, make_job(root)


def test_two_runs_save_byte_identical_models(cfg, tmp_path):
    """In one process and in two separate ones (as a user runs the job twice)."""
    from yoloquant.config import load_config

    root, path = cfg
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        quantize(load_config(path), out)
    for out in (tmp_path / "c", tmp_path / "d"):
        proc = subprocess.run([sys.executable, "post_quant.py", "--config_path", str(path),
                               "--save_dir", str(out)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(out)
    models = [(out / PADDLE_MODEL).read_bytes() for out in runs]
    assert all(m == models[0] for m in models[1:])
    params = [(out / "model.pdiparams").read_bytes() for out in runs]
    assert all(p == params[0] for p in params[1:])
    # and the canonical program still runs in int8, as the QDQ ONNX does
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    y = PaddleInferenceBackend(PaddleModelFiles.find(runs[0]), int8=True)(x)
    assert y.shape == (1, 256, 7) and np.isfinite(y).all()


def test_paddle_bars_and_notices_stay_out_and_warnings_come_through(cfg, tmp_path, capfd, caplog):
    root, path = cfg
    from yoloquant.config import load_config

    quantize(load_config(path), tmp_path / "out")
    err = capfd.readouterr().err
    assert "Sampling stage" not in err and "Adding quant op" not in err
    assert "old way to load inference model" not in err
    assert "Load model and set data loader" not in err  # Paddle's INFO chatter
    paddle_log = logging.getLogger("paddle.static.quantization.post_training_quantization")
    with caplog.at_level(logging.WARNING, logger="yoloquant"), quiet_ptq():
        paddle_log.warning("something the user must see")
        logging.getLogger("paddle.static.io").warning("The old way to load inference model is "
                                                      "deprecated. Please specify path_prefix.")
    assert [r.getMessage() for r in caplog.records] == ["paddle: something the user must see"]
    assert paddle_log.handlers and not any(type(h).__name__ == "_ToOurLog" for h in paddle_log.handlers)
