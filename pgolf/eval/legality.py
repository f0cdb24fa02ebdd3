"""The four conditions of Issue #1017 as checks (docs/records/record-stack.md §5.8;
docs/records/hedge-stack.md §5.6-5.7).

1. Causal: p_t depends only on the artifact and x_<t (checked by perturbing a token: `causal_diff`).
2. Normalised: the scored probability comes from a full distribution over the vocabulary
   (`assert_normalised`, `scored_nll` on every scoring path).
3. Score before update: every update trains only on tokens already scored (`EvalStream.declare_update`
   online; `audit_trace` afterwards from the trace's update summary).
4. Single pass: every validation target is scored exactly once (`EvalStream.record`, `audit_trace`).

The helpers work on a `pgolf.eval.trace.Trace` (`load_trace(path)` reads a saved one), so anyone can
audit an evaluation from its `--trace` file.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from pgolf.errors import LegalityError

__all__ = ["LegalityError", "assert_normalised", "check_log_distribution", "scored_nll", "audit_trace",
           "causal_diff", "perturb", "check_causal"]


def assert_normalised(p: torch.Tensor, *, vocab_size: int | None = None, tol: float = 1e-5,
                      what: str = "distribution") -> None:
    """Refuse p (..., V) unless every row is a distribution over the full vocabulary (p >= 0, sum 1)."""
    if vocab_size is not None and p.size(-1) != vocab_size:
        raise LegalityError(f"{what}: {p.size(-1)} entries for a vocabulary of {vocab_size}")
    p = p.double()
    if not torch.isfinite(p).all() or (p < 0).any():
        raise LegalityError(f"{what}: negative or non-finite probabilities")
    err = (p.sum(-1) - 1.0).abs().max().item() if p.numel() else 0.0
    if err > tol:
        raise LegalityError(f"{what}: sums to 1 +- {err:.3g} (> {tol:g}); not a normalised distribution")


def check_log_distribution(logp: torch.Tensor, vocab_size: int, rows: int = 8, what: str = "distribution") -> None:
    """assert_normalised on `rows` evenly spaced rows of log-probabilities logp (..., V) (all when rows <= 0)."""
    flat = logp.detach().reshape(-1, logp.size(-1))
    if rows > 0 and flat.size(0) > rows:
        flat = flat[torch.linspace(0, flat.size(0) - 1, rows, device=flat.device).long()]
    assert_normalised(flat.exp(), vocab_size=vocab_size, what=what)


def scored_nll(logp: torch.Tensor, targets: torch.Tensor, *, vocab_size: int, check_rows: int = 8) -> torch.Tensor:
    """-log p(y) from log-probabilities logp (..., V) checked to be a distribution over the vocabulary."""
    check_log_distribution(logp, vocab_size, check_rows)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# ---- auditing a trace (a pgolf.eval.trace.Trace: `load_trace(path)` reads a saved one)

def audit_trace(trace: Any, num_targets: int | None = None) -> dict[str, Any]:
    """Conditions 3 and 4 from a trace alone; returns {ok, violations, ...}.

    Single pass: positions are unique (and, with `num_targets`, cover 0..N-1). Score before update:
    update u happened after `update_at[u]` tokens were scored and trained on tokens whose trace
    index is at most `update_max_order[u]` (-1 when one was never scored), so it is legal iff
    0 <= max_order < update_at; and every token's `step` equals the number of updates before it.
    Distributed traces are audited per rank (positions scored on other ranks count as scored).
    """
    t = trace
    out: list[str] = []
    pos = np.asarray(t.position)
    uniq = np.unique(pos)
    if uniq.size != pos.size:
        out.append(f"single pass: {pos.size - uniq.size} positions scored more than once")
    if num_targets is not None:
        if uniq.size != num_targets or (uniq.size and (uniq[0] != 0 or uniq[-1] != num_targets - 1)):
            out.append(f"single pass: {uniq.size} distinct positions scored of {num_targets}")
    ranks = np.asarray(t.rank) if getattr(t, "rank", None) is not None else np.zeros(pos.size, np.int64)
    urank = np.asarray(t.update_rank) if getattr(t, "update_rank", None) is not None \
        else np.zeros(len(t.update_at), np.int64)
    for r in np.unique(np.concatenate([ranks, urank])):
        at, mx = np.asarray(t.update_at)[urank == r], np.asarray(t.update_max_order)[urank == r]
        # -1: trained on a position never scored; -2: every position it used was scored on another rank
        bad = np.flatnonzero((mx >= at) | (mx == -1))
        if bad.size:
            u = bad[0]
            out.append(f"score before update: rank {r} update {u} (after {at[u]} scored tokens) trained on "
                       f"{'an unscored token' if mx[u] == -1 else f'the token scored at index {mx[u]}'}"
                       f" ({bad.size} such updates)")
        steps = np.asarray(t.step)[ranks == r]
        expect = np.searchsorted(at, np.arange(steps.size), side="right")
        if not np.array_equal(steps, expect):
            i = int(np.flatnonzero(steps != expect)[0])
            out.append(f"step: rank {r} token {i} has step {steps[i]}, {expect[i]} updates preceded it")
    return {"ok": not out, "violations": out, "tokens": int(pos.size), "updates": int(len(t.update_at))}


def causal_diff(trace_a: Any, trace_b: Any, position: int) -> int | None:
    """Condition 1: with token `position + 1` perturbed in run b, every entry scored before target
    `position` must be bit-identical. Returns the first differing trace index, or None."""
    a, b = trace_a, trace_b
    hits = np.flatnonzero(np.asarray(a.position) == position)
    if hits.size != 1:
        raise ValueError(f"position {position} appears {hits.size} times in the trace")
    k = int(hits[0])
    if len(b.position) < k:
        return len(b.position)
    same_pos = np.asarray(a.position[:k]) == np.asarray(b.position[:k])
    same_loss = np.asarray(a.loss[:k]).view(np.uint32) == np.asarray(b.loss[:k]).view(np.uint32)
    bad = np.flatnonzero(~(same_pos & same_loss))
    return int(bad[0]) if bad.size else None


def perturb(tokens: torch.Tensor, index: int, vocab_size: int, avoid: tuple[int, ...] = (1,)) -> torch.Tensor:
    """A copy of `tokens` with tokens[index] changed to another id that is not in `avoid` (e.g. BOS)."""
    out = tokens.clone()
    v = int(out[index])
    for step in range(1, vocab_size):
        w = (v + step) % vocab_size
        if w not in avoid:
            out[index] = w
            return out
    raise ValueError("no id to perturb to")


def check_causal(run: Callable[[torch.Tensor], Any], tokens: torch.Tensor, position: int, vocab_size: int,
                 bos_id: int = 1) -> int | None:
    """Run `run(tokens) -> Trace` on the tokens and on a copy with target `position` (token
    position + 1) perturbed; the first trace index scored before it that differs, or None."""
    a = run(tokens)
    b = run(perturb(tokens, position + 1, vocab_size, avoid=(bos_id,)))
    return causal_diff(a, b, position)
