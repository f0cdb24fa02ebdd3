"""Soft-capped cross-entropy: z = c*tanh(u/c), then CE in fp32 over the full vocabulary.

The eager path is the reference and the only one used for scoring. On CUDA, training can use a
compiled version of the same function (`fused_softcap_cross_entropy`): Inductor fuses the cap, the
log-sum-exp and the gather into one kernel so the soft-capped logits are never stored (the role of the
Triton kernel of PR #1787). Both compute the same value; a test checks it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                          reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V) pre-cap, targets (B, T) -> mean CE, or per-token CE (B, T) in fp32."""
    z = logits.float()
    if cap > 0:
        z = cap * torch.tanh(z / cap)
    loss = F.cross_entropy(z.view(-1, z.size(-1)), targets.reshape(-1), reduction="none")
    loss = loss.view(targets.shape)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


@functools.cache
def _compiled():
    return torch.compile(softcap_cross_entropy, dynamic=False)


def fused_softcap_cross_entropy(logits, targets, cap, reduction="mean"):
    """The compiled (fused) form for CUDA training; identical value to the eager function."""
    if logits.device.type != "cuda" or torch.compiler.is_compiling():  # inside a compiled model: fused there
        return softcap_cross_entropy(logits, targets, cap, reduction)
    return _compiled()(logits, targets, cap, reduction)
