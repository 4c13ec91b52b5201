"""What Paddle writes: its saved programs, made deterministic, and its console output, kept out
of the user's log (both visible workarounds, tested in tests/test_paddle_output.py).

* Op order. Two identical PTQ runs saved different model.pdmodel bytes: after the quantization
  passes Paddle turns its IrGraph back into a program with a topological sort whose ties follow
  node addresses, so the op order (and so the bytes) changed from run to run, though every
  order computes the same. `canonical_program` re-sorts the ops of each block into one
  deterministic topological order (ties broken by the op's own content); only the order of
  independent ops changes.
* Call stacks. Ops created in Python (feed, fetch, the scale op save_inference_model appends)
  carry an `op_callstack` attribute: the Python stack that created them, file paths and line
  numbers of whatever script ran the job. It is debugging information Paddle Inference never
  reads, and made the same model differ by caller; `canonical_program` drops it.
* Names. save_inference_model names the scale op it appends after the process-wide unique-name
  counter, so a second save in the same process wrote `save_infer_model/scale_0.tmp_1` where
  the first wrote `.tmp_0`; `fresh_names()` saves with a fresh counter.
* Console. Paddle's PTQ draws its own tqdm bars (a screenful of carriage returns in a log
  file) and logs through its own stderr handlers, including "The old way to load inference
  model is deprecated" on every run (its API, not the user's doing). `quiet_ptq()` replaces the
  bars with ours (yoloquant.progress: a bar on a terminal, periodic lines otherwise), drops that
  notice and Paddle's INFO chatter, and passes Paddle's warnings on to our log (and run.log).
"""
from __future__ import annotations

import heapq
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("yoloquant")

_PADDLE_LOGGERS = ("paddle.static.io", "paddle.static.quantization.post_training_quantization",
                   "paddle.static.quantization.quantization_pass")
_BAR_MODULES = ("paddle.static.quantization.post_training_quantization",
                "paddle.static.quantization.quantization_pass")
_CALLSTACK = "op_callstack"
_DROPPED = ("The old way to load inference model is deprecated",)


# ---- deterministic programs ------------------------------------------------------------------
def _args(slots) -> list[str]:
    return [a for slot in slots for a in slot.arguments]


def _canonical_order(ops) -> list[int]:
    """A topological order of `ops` (OpDesc protos) that depends only on their content.

    An op must stay after the last earlier writer of each variable it reads or writes, and after
    every earlier reader of a variable it overwrites; among the ops free to go next the smallest
    (type, outputs, serialized desc) goes first.
    """
    deps: list[set] = [set() for _ in ops]
    writer: dict[str, int] = {}
    readers: dict[str, set] = {}
    for i, op in enumerate(ops):
        ins, outs = _args(op.inputs), _args(op.outputs)
        for name in ins + outs:
            if name in writer:
                deps[i].add(writer[name])
        for name in outs:
            deps[i].update(readers.get(name, ()))
        for name in ins:
            readers.setdefault(name, set()).add(i)
        for name in outs:
            writer[name] = i
            readers[name] = set()
        deps[i].discard(i)
    keys = [(op.type, tuple(_args(op.outputs)), op.SerializeToString()) for op in ops]
    users: list[list[int]] = [[] for _ in ops]
    waiting = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [(keys[i], i) for i in range(len(ops)) if not waiting[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, (keys[u], u))
    if len(order) != len(ops):  # cannot happen: every dependency points to an earlier op
        raise RuntimeError("canonical_program: the op dependencies have a cycle")
    return order


def canonical_program(data: bytes) -> bytes:
    """A serialized Paddle ProgramDesc with the ops of every block in canonical order."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()
    desc.ParseFromString(data)
    for block in desc.blocks:
        copies = []
        for op in block.ops:
            c = framework_pb2.OpDesc()
            c.CopyFrom(op)
            del c.attrs[:]
            c.attrs.extend(a for a in op.attrs if a.name != _CALLSTACK)
            copies.append(c)
        del block.ops[:]
        block.ops.extend(copies[i] for i in _canonical_order(copies))
    return desc.SerializeToString()


def canonicalize_program_file(path: str | os.PathLike) -> None:
    """Rewrite a saved .pdmodel in canonical op order (in place, atomically)."""
    from .fileio import atomic_write

    with open(path, "rb") as f:
        data = f.read()
    canonical = canonical_program(data)
    if canonical != data:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(canonical))


@contextmanager
def fresh_names() -> Iterator[None]:
    """Paddle's unique-name counter starts over inside the block (see module doc)."""
    from paddle.utils import unique_name

    with unique_name.guard():
        yield


# ---- console output --------------------------------------------------------------------------
class _ToOurLog(logging.Handler):
    """Paddle's warnings and errors, as ours (run.log keeps them); its notices dropped."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if any(message.startswith(text) for text in _DROPPED):
            return
        log.log(record.levelno, "paddle: %s", message)


def _bar(*args, total=None, bar_format: str = "", **kwargs):
    """Stands in for tqdm in Paddle's PTQ: its bar_format starts with what the bar counts."""
    from .progress import Progress

    desc = bar_format.split(":|")[0].strip() or "paddle"
    return Progress(total, f"paddle: {desc}", "steps")


@contextmanager
def quiet_ptq() -> Iterator[None]:
    """Paddle's PTQ console output routed as the module doc says, for this block."""
    saved_bars = {}
    for name in _BAR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "tqdm"):
            saved_bars[module] = module.tqdm
            module.tqdm = _bar
    saved_loggers = []
    for name in _PADDLE_LOGGERS:
        logger = logging.getLogger(name)
        saved_loggers.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [_ToOurLog()]
        logger.propagate = False
    try:
        yield
    finally:
        for module, bar in saved_bars.items():
            module.tqdm = bar
        for logger, handlers, propagate in saved_loggers:
            logger.handlers, logger.propagate = handlers, propagate
