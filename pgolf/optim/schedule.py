"""Learning-rate multiplier and Muon momentum warm-up (docs/records/record-stack.md §3.3-3.4, Appendix B).

There is no LR warm-up in any record: the multiplier is 1, then decays linearly during the
warm-down, never below `min_lr` (MIN_LR, PR #1787).
"""
from __future__ import annotations

from pgolf.config import OptimConfig, TrainConfig


def lr_multiplier(step: int, elapsed_s: float, cfg: TrainConfig, budget_s: float,
                  step_ms_avg: float) -> float:
    """Multiplier applied to every group's base LR at optimizer step `step`.

    `budget_s` is the training loop's wall-clock budget with `gptq_reserve_seconds` already taken
    off (0 = no time budget: fall back to `cfg.iterations`). `step_ms_avg` is the mean step time so
    far, used by the baseline's iteration-based warm-down to estimate when it starts.
    """
    if cfg.warmdown_frac > 0:
        # records from #1530 on: warm-down over the last fraction of the wall-clock budget
        if budget_s > 0:
            frac = elapsed_s / budget_s
        else:
            frac = step / max(cfg.iterations, 1)
        if frac < 1.0 - cfg.warmdown_frac:
            return 1.0
        mult = (1.0 - frac) / cfg.warmdown_frac
    elif cfg.warmdown_iters > 0:
        if budget_s > 0:
            # baseline: the last `warmdown_iters` steps, estimated on wall-clock from the mean step time
            warmdown_ms = cfg.warmdown_iters * step_ms_avg
            remaining_ms = max(budget_s - elapsed_s, 0.0) * 1000.0
            if warmdown_ms <= 0 or remaining_ms >= warmdown_ms:
                return 1.0
            mult = remaining_ms / warmdown_ms
        else:
            if step < cfg.iterations - cfg.warmdown_iters:
                return 1.0
            mult = (cfg.iterations - step) / cfg.warmdown_iters
    else:
        return 1.0
    return max(mult, cfg.min_lr, 0.0)


def momentum_at(step: int, cfg: OptimConfig) -> float:
    """Muon momentum: linear from `muon_momentum_warmup_start` to `muon_momentum` (0.92 -> 0.97
    over 1,500 steps in #1855; 0.85 -> 0.95 over 500 in the baseline)."""
    n = cfg.muon_momentum_warmup_steps
    frac = min(step / n, 1.0) if n > 0 else 1.0
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
