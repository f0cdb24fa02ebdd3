"""CROWN-Q: a quantisation-aware penalty in the warm-down (PR #700 and later in the Hedge line,
#720 and #430 included; docs/records/hedge-stack.md §1.2).

Once the LR multiplier drops below `optim.crown_q_below_lr` (the records' late-QAT threshold, 0.5),
every step adds  lambda / 12 * sum over Linear weights of mean_ij(w_ij^2 * Delta_i^2),  Delta_i =
max_j |w_ij| / clip_range, the per-row step of an int quantiser with `clip_range` levels each side
(15 for the records' int5). Delta is held constant (no gradient through the row maximum), so the
gradient pulls each weight towards zero in proportion to its row's quantisation step: the expected
squared rounding error Delta^2 / 12, weighted by w^2. As in the records it is computed on the
uncompiled model, once per optimizer step, and the logged training loss stays the plain CE.
The records' late STE QAT is not reproduced: torch.compile constant-folded its flag, so it never ran.
"""
from __future__ import annotations

import torch
from torch import nn


def crown_q_penalty(model: nn.Module, clip_range: int) -> torch.Tensor:
    """sum over nn.Linear weights of mean(w^2 * Delta^2) / 12 (without lambda)."""
    terms = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.float()
            step2 = (w.detach().abs().amax(dim=1, keepdim=True) / clip_range) ** 2
            terms.append((w * w * step2).mean())
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(terms).sum() / 12.0


def crown_q_active(oc, lr_mult: float) -> bool:
    return oc.crown_q_lambda > 0 and lr_mult < oc.crown_q_below_lr
