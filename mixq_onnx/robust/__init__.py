"""Robustness training (issue 13, in progress): SymReg and SatNL, after Park, Jang and Park, "Symmetry
Regularization and Saturating Nonlinearity for Robust Quantization" (ECCV 2022).

The paper's full text is not available here; the formulas are this project's reading of the method from
its abstract and secondary summaries (see `regularizers.py` for every choice made). So far: the two terms
and their configuration; the training loop (`robustify`), the CLI and `sweep` come next.
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

__all__ = ["PAIRINGS", "RobustConfig", "SatNL", "apply_satnl", "regularized_layers", "remove_satnl",
           "symreg_channel_penalty", "symreg_loss"]
