"""Optimizers: Muon (classic + Polar Express, MuonEq-R) for matrices, AdamW groups for the rest,
the wall-clock LR schedule and the weight EMA (docs/records/record-stack.md §3)."""
from pgolf.optim.ema import EMA
from pgolf.optim.groups import (CONTROL_PATTERNS, OptimizerSet, build_optimizers, classify_params,
                                clip_grad_norm)
from pgolf.optim.muon import CLASSIC, POLAR_EXPRESS, Muon, ns_coefficients, ns_dtype_for, zeropower
from pgolf.optim.schedule import lr_multiplier, momentum_at

__all__ = [
    "CLASSIC", "CONTROL_PATTERNS", "EMA", "Muon", "OptimizerSet", "POLAR_EXPRESS", "build_optimizers",
    "classify_params", "clip_grad_norm", "lr_multiplier", "momentum_at", "ns_coefficients", "ns_dtype_for",
    "zeropower",
]
