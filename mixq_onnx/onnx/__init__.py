"""ONNX: QDQ export (TensorRT-ready), lint, and onnxruntime verification."""
from .export import export_fp, export_int4_weight_only, export_onnx, export_qdq

__all__ = ["export_fp", "export_int4_weight_only", "export_onnx", "export_qdq"]
