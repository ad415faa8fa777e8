"""Exporters: exact-opset ONNX, precision variants (FP16, INT8 QDQ) and TensorRT engines."""
