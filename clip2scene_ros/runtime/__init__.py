"""Inference at run time: the Predictor and its backends (torch, onnxruntime, TensorRT)."""
