"""Quantization-aware training (issue 14): NIPQ mixed precision under a bit or BOPs budget, and LSQ at fixed
bits as its baseline. `train(model, QATConfig(...), data)` returns the fake-quant model `quantize` would,
each quantizer with its own bits; `save_qat` writes it as a result folder (plus qat.json and bits.png)."""
from .budget import Costs, achieved, average_bits, budget_loss, gbops, measure_costs, round_to_budget
from .config import QAT_METHODS, QATConfig
from .noise import lsq_quant, nipq_quant, sample_noise
from .report import plot_bits, save_qat, summary
from .trainer import train

__all__ = [
    "QAT_METHODS", "Costs", "QATConfig", "achieved", "average_bits", "budget_loss", "gbops", "lsq_quant",
    "measure_costs", "nipq_quant", "plot_bits", "round_to_budget", "sample_noise", "save_qat", "summary", "train",
]
