"""Post-training quantization: `quantize(model, QuantConfig(...), calib)` -> fake-quant model;
`save_quantized` / `load_quantized` round-trip it bit for bit. Methods come from the registry
`mixq_onnx.methods.METHODS` (light: the CLI reads it without importing torch)."""
from ..methods import METHODS, PRESETS, Method, Phase, register_method
from .config import QuantConfig, ReconParams
from .evaluate import EvalResult, evaluate, evaluate_data, predict
from .graph import prepare, quantizers, units
from .io import load_quantized, load_quantized_dir, load_result, read_quant_json, save_quantized
from .quantizer import ActQuantizer, WeightQuantizer
from .reconstruct import quantize, summarize

__all__ = [
    "METHODS", "PRESETS", "ActQuantizer", "EvalResult", "Method", "Phase", "QuantConfig", "ReconParams",
    "WeightQuantizer", "evaluate", "evaluate_data", "load_quantized", "load_quantized_dir", "load_result", "predict", "prepare", "quantize",
    "quantizers", "read_quant_json", "register_method", "save_quantized", "summarize", "units",
]
