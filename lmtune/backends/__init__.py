"""Runtimes that stand in for the PyTorch model at prediction time (onnxruntime)."""
