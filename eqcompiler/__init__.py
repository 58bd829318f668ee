"""eqc: an ONNX graph-rewriting compiler that quantizes large language models."""
__version__ = "0.1.0"
