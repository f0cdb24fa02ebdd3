"""Scoring the validation set in tokenizer-true bits per byte.

Every target is scored once with the model's one forward (per-token CE in fp32 over the full
vocabulary, soft-capped logits), its bytes come from the scoring LUTs (or the CaseOps sidecar), and
the float64 sums are all-reduced across ranks: val_bpb = sum(loss) / (ln 2 * sum(bytes)).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
import torch.distributed as dist


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """All-reduce a float64 vector of sums when running distributed."""
    if dist.is_available() and dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums)
    return sums


def sums_to_metrics(loss_sum: float, tokens: float, nbytes: float) -> dict[str, float]:
    val_loss = loss_sum / max(tokens, 1.0)
    val_bpb = loss_sum / (math.log(2) * max(nbytes, 1.0))
    return {"val_loss": val_loss, "val_bpb": val_bpb, "tokens": int(tokens), "bytes": int(nbytes)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: Any, seq_len: int, batch_seqs: int = 32, *,
             rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Non-overlapping windows of `seq_len` targets; rank r takes a contiguous share of windows."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, nbytes = val.tokens, val.bytes
    n_seqs = (tokens.numel() - 1) // seq_len
    lo, hi = n_seqs * rank // world_size, n_seqs * (rank + 1) // world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    for s in range(lo, hi, batch_seqs):
        e = min(s + batch_seqs, hi)
        chunk = tokens[s * seq_len: e * seq_len + 1].to(device, non_blocking=True)
        x = chunk[:-1].view(e - s, seq_len)
        y = chunk[1:].view(e - s, seq_len)
        with autocast_for(device):
            loss = model(x, y, reduction="none")
        sums[0] += loss.double().sum()
        sums[1] += y.numel()
        sums[2] += nbytes[s * seq_len: e * seq_len].to(device).double().sum()
    sums = reduce_sums(sums)
    model.train(was_training)
    out = sums_to_metrics(*sums.tolist())
    out["seconds"] = time.perf_counter() - t0
    return out
