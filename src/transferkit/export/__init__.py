"""Portable exports of a run: ONNX (``export --format onnx``) with its onnxruntime loader."""
