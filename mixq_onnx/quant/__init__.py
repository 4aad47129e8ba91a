"""Post-training quantization: `quantize(model, QuantConfig(...), calib)` -> fake-quant model;
`save_quantized` / `load_quantized` round-trip it bit for bit."""
from .config import METHODS, PRESETS, QuantConfig
from .evaluate import EvalResult, evaluate, predict
from .graph import prepare, quantizers, units
from .io import load_quantized, load_quantized_dir, read_quant_json, save_quantized
from .quantizer import ActQuantizer, WeightQuantizer
from .reconstruct import quantize, summarize

__all__ = [
    "METHODS", "PRESETS", "ActQuantizer", "EvalResult", "QuantConfig", "WeightQuantizer", "evaluate",
    "load_quantized", "load_quantized_dir", "predict", "prepare", "quantize", "quantizers", "read_quant_json",
    "save_quantized", "summarize", "units",
]
