"""TensorRT: engine builds (TensorRT 10.12+/11 or TensorRT-RTX, strongly typed), the per-layer precision report,
and running and timing plans. Its modules import tensorrt only when they need it."""
