"""Robustness training: SymReg and SatNL, after Park, Jang and Park, "Symmetry Regularization and Saturating
Nonlinearity for Robust Quantization" (ECCV 2022).

The paper's full text is not available here; the formulas are this project's reading of the method from
its abstract and secondary summaries (see `regularizers.py` for every choice made). `robustify` fine-tunes a
float model on the shared loop in `mixq_onnx/training.py` and returns a plain float model; `mixq_onnx.sweep`
measures any checkpoint across bit-widths and methods.
"""
from __future__ import annotations

from .regularizers import (
    PAIRINGS,
    RobustConfig,
    SatNL,
    apply_satnl,
    regularized_layers,
    remove_satnl,
    symreg_channel_penalty,
    symreg_loss,
)
from .train import check_writable, robustify, save_checkpoint

__all__ = ["PAIRINGS", "RobustConfig", "SatNL", "apply_satnl", "regularized_layers", "remove_satnl",
           "check_writable", "robustify", "save_checkpoint",
           "symreg_channel_penalty", "symreg_loss"]
