"""Per-document low-rank adapters applied inside the model's one forward (PR #1530 / #1765).

`BatchedLoRA` holds an independent adapter for every row of the batch (one document per row) and every
virtual layer slot, on the projections named in `targets` (q, k, v, o, mlp, head). The model calls
`lora.add(slot, name, x, out)` where it applies that projection, so test-time training runs the very
forward that training and scoring run. With every B at zero the forward equals the plain forward exactly.

    delta = (x A^T) B^T * (alpha / r)      A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from pgolf.model.gpt import GPT

TARGETS = ("q", "k", "v", "o", "mlp", "head")


class BatchedLoRA(nn.Module):
    def __init__(self, model: GPT, batch_size: int, rank: int, alpha: float = 0.0,
                 targets: tuple[str, ...] = TARGETS):
        super().__init__()
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}")
        self.rank, self.batch_size = rank, batch_size
        self.targets = tuple(targets)
        # alpha/r output scaling (PR #1765); alpha = 0 keeps the unscaled pre-#1765 form
        self.scale = alpha / rank if alpha > 0 else 1.0
        dims = model.lora_dims()
        slots = model.num_slots
        device = model.tok_emb.weight.device
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in self.targets:
            fan_in, fan_out = dims[name]
            n = 1 if name == "head" else slots  # one head adapter; one adapter per slot elsewhere
            self.A[name] = nn.Parameter(torch.empty(n, batch_size, rank, fan_in, device=device))
            self.B[name] = nn.Parameter(torch.zeros(n, batch_size, fan_out, rank, device=device))
        self.reset_A()

    @torch.no_grad()
    def reset_A(self) -> None:
        for A in self.A.values():
            bound = 1.0 / math.sqrt(A.size(-1))
            A.uniform_(-bound, bound)

    @torch.no_grad()
    def reset_B(self) -> None:
        for B in self.B.values():
            B.zero_()

    def add(self, slot: int | None, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + the adapter's delta for input x (B, T, in); `out` unchanged when `name` is off."""
        if name not in self.A:
            return out
        i = 0 if slot is None else slot
        A, B = self.A[name][i], self.B[name][i]  # (Bsz, r, in), (Bsz, out, r)
        if x.size(0) != A.size(0):
            raise ValueError(f"LoRA batch {A.size(0)} != input batch {x.size(0)}")
        delta = torch.bmm(torch.bmm(x, A.transpose(1, 2).to(x.dtype)), B.transpose(1, 2).to(x.dtype))
        return out + self.scale * delta
