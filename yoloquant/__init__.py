"""yoloquant: post-training quantization of YOLO detectors exported to ONNX."""

__version__ = "0.1.0"
