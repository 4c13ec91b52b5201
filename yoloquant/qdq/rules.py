"""Per-runtime placement rules, as data. ``deploy_backend`` picks one.

* onnxruntime: ORT's CPU provider fuses a node into an int8 kernel only when every activation
  input comes from a DequantizeLinear and its output goes to one QuantizeLinear (its QDQ
  selectors: Conv -> QLinearConv, Add/Mul -> QLinearAdd/QLinearMul, Concat -> QLinearConcat,
  Sigmoid/AveragePool/GlobalAveragePool -> QLinear*, and MaxPool/Resize/Reshape/Transpose run on
  the uint8 codes when input and output share one grid). So every tensor between two int8
  nodes gets one Q/DQ pair, conv outputs included; activations are uint8 (int8 activations are
  fused on ARM only), conv inputs on asymmetric grids, and the prediction convs a Sigmoid reads
  run in int8 too (yolov5n: 59 of 60 convs, 0.60x FP32 CPU time on an AMD EPYC 25/17).
* openvino: OpenVINO fuses Conv + bias + activation and requantizes into the next conv's input
  FakeQuantize, so Q/DQ go on node inputs only (conv inputs, Add inputs, Concat inputs with one
  shared grid, MaxPool/Resize inputs); a requantized conv output would split the fusion.
  Activations signed symmetric int8 (faster than uint8 with a zero point here); the image keeps
  its exact uint8 grid.
* tensorrt: NVIDIA's explicit-quantization rules: signed symmetric int8 activations (zero point
  0), Q/DQ on the inputs of Conv (weights int8 per output channel, bias left float: TensorRT
  quantizes it itself), on both inputs of a residual Add (so the Add fuses into the conv that
  produces one of them), Concat inputs sharing one scale and MaxPool/Resize with the scale of
  what they feed (no requantization); conv outputs and activations (SiLU, HardSwish) are not
  quantized: they fuse into the conv.

``gate`` says how a gated activation x * gate(x) (SiLU = Sigmoid, HardSwish = HardSigmoid) runs
between two int8 convs: "qlinear" quantizes the gate's output on a fixed [0, 1] grid and the Mul
(ORT: QLinearSigmoid + QLinearMul), "float" leaves gate and Mul float between the conv output's
DQ and the next Q (ORT fuses Sigmoid * Mul into one QuickGelu kernel), "fused" puts no Q/DQ
around them at all (OpenVINO / TensorRT fuse them into the conv).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..errors import ModelError

GATE_FORMS = ("qlinear", "float", "fused")


@dataclass(frozen=True)
class BackendRules:
    name: str
    activation_type: str  # "uint8" (asymmetric grids allowed) or "int8" (symmetric, zero point 0)
    conv_outputs: bool  # requantize conv raw outputs (ORT fuses a Conv only with a Q after it)
    node_outputs: bool  # glue nodes quantize their outputs too (else only their inputs)
    quantize_bias: bool  # int32 bias (QLinearConv's form); TensorRT takes a float bias
    ops: frozenset  # op kinds quantized as nodes (see operators/)
    gate: str  # form of SiLU (x * Sigmoid(x)), see the module doc
    exact_input: bool  # the image input gets its exact grid (uint8 codes of the pixels)
    # run the conv reading the image (3 channels) in int8: ORT's u8 kernel is slow at so few
    # input channels (yolov5n stem, 1 thread: QLinearConv 7.7 ms, float NCHWc conv 4.6 ms)
    int8_image_conv: bool = True
    # quantize the inputs/weights of the prediction convs (their outputs stay float): ORT cannot
    # run a conv with a float output in int8, so there they only lose the fast float kernel
    int8_head_convs: bool = True
    # prediction convs read only by a Sigmoid (score logits; all of yolov5's) run in int8 with
    # their output requantized on a sigmoid-clipped grid (precision.sigmoid_clip), whatever
    # int8_head_convs says; the decode after them stays float
    int8_head_outputs: bool = False
    # form of HardSwish (x * HardSigmoid(x)); None: as ``gate``. ORT has no int8 HardSigmoid,
    # and on YOLOv6-Lite-M 320 the 'qlinear' form cost accuracy and speed (val mAP 0.209 vs
    # 0.275 'float', FP32 0.289; ORT process CPU 20.1 vs 16.0 ms)
    hardswish_gate: Optional[str] = None
    # conv inputs on [max(min, -T), T] (asymmetric uint8, zero point where 0 falls) instead of
    # [-T, T]: SiLU outputs reach only -0.28, so the symmetric grid leaves half its codes unused
    asymmetric_inputs: bool = False
    # a float conv behind a GlobalAveragePool (an SE block's squeeze) reads the mean of the
    # rounded tensor: the pool's input is then not kept float, so ORT can fuse the conv that
    # produces it (its output has a float reader otherwise); see placement._protected. On
    # YOLOv6-Lite-M 320 (EPYC 25/17): 64 instead of 55 QLinearConv, mAP against the protected
    # form val +0.06 [-0.61, +1.10], held-out -0.17 [-0.89, +0.48]; ORT 14.6 vs 14.9 ms (CPU
    # 19.9 vs 20.8 ms, FP32 9.9): the float islands, not these convs, dominate that model
    pool_reads_rounded: bool = False

    def __post_init__(self):
        for form in (self.gate, self.hardswish_gate or self.gate):
            if form not in GATE_FORMS:
                raise ModelError(f"gate form must be one of {GATE_FORMS}, got {form!r}")

    def gate_form(self, gate_op: str) -> str:
        """The form of the gated activation whose gate is ``gate_op`` (Sigmoid / HardSigmoid)."""
        return (self.hardswish_gate or self.gate) if gate_op == "HardSigmoid" else self.gate

    @property
    def symmetric(self) -> bool:
        return self.activation_type == "int8"


GLUE = frozenset({"concat", "maxpool", "resize", "add", "mul", "avgpool", "sigmoid", "hardsigmoid", "relu"})

RULES = {
    "onnxruntime": BackendRules("onnxruntime", "uint8", conv_outputs=True, node_outputs=True,
                                quantize_bias=True, ops=GLUE, gate="qlinear", exact_input=True,
                                int8_image_conv=False, int8_head_convs=False,
                                hardswish_gate="float", asymmetric_inputs=True,
                                int8_head_outputs=True, pool_reads_rounded=True),
    # unsigned activations: signed ones ran faster on a Xeon with AMX (yolov5n, 2 threads,
    # process CPU ms: int8 33-34 vs uint8 38-41), but OpenVINO 2026.4.1 on an AMD EPYC (family
    # 26 model 2, AVX512-VNNI) computes garbage from them: the glue test graph of
    # tests/test_qdq_placement.py gave an output SNR of -0.8 dB with int8 (0.0 with oneDNN held
    # to AVX2), 28.9 dB with uint8; ONNX Runtime runs both forms at ~29 dB. Correct on every
    # CPU first.
    "openvino": BackendRules("openvino", "uint8", conv_outputs=False, node_outputs=False,
                             quantize_bias=True, ops=frozenset({"concat", "maxpool", "resize", "add",
                                                                "mul", "avgpool"}),
                             gate="fused", exact_input=True, asymmetric_inputs=True),
    "tensorrt": BackendRules("tensorrt", "int8", conv_outputs=False, node_outputs=False,
                             quantize_bias=False, ops=frozenset({"concat", "maxpool", "resize", "add",
                                                                 "avgpool"}),
                             gate="fused", exact_input=False),
}
DEPLOY_BACKENDS = tuple(RULES)


def rules_for(backend: str, **overrides) -> BackendRules:
    if backend not in RULES:
        raise ModelError(f"deploy_backend must be one of {', '.join(DEPLOY_BACKENDS)}, got {backend!r}")
    return replace(RULES[backend], **overrides) if overrides else RULES[backend]
