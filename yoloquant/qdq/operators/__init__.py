"""One small handler per op kind. Each says, for one node, which of its tensors must be quantized
and which of them must share one grid; ``placement`` turns that into Q/DQ pairs.

HANDLERS maps an ONNX op type to its handler; an op type with none is left float (and listed).
"""
from . import activation, concat, conv, elementwise, pool, resize

HANDLERS = {}
for _module in (conv, concat, pool, resize, elementwise, activation):
    for _op in _module.OP_TYPES:
        HANDLERS[_op] = _module.plan

# ops that never touch values in a way quantization cares about and that sit between convs in
# YOLO graphs only as shape plumbing: no handler needed, but not "unknown" either
SHAPE_OPS = frozenset({"Shape", "Gather", "Unsqueeze", "Squeeze", "Constant", "Cast", "Reshape",
                       "Transpose", "Split", "Slice", "Flatten", "Identity", "Expand"})
