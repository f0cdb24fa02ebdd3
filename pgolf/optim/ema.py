"""Exponential moving average of the weights (docs/records/record-stack.md §3.5; docs/records/hedge-stack.md §1.3).

An fp32 copy of the full state dict (parameters and float buffers), updated after every optimizer
step: `ema <- d*ema + (1-d)*w`, rounded as the records round it (`EMA.update`). The EMA weights are the
ones exported. With MIN_LR 0.1 it is worth about 0.01 BPB (#1855), so the copy stays fp32 even where
the live weight is bf16 (tok_emb). Pass the bare model, not a DDP / compiled wrapper, so the keys match
the model's own.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        with torch.no_grad():
            self.shadow = {k: v.detach().float().clone()
                           for k, v in model.state_dict().items() if v.is_floating_point()}

    def _live(self, model: nn.Module) -> list[torch.Tensor]:
        sd = model.state_dict()
        return [sd[k] for k in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d*ema, then ema += (1-d)*w: the records' two roundings (`ema_t.mul_(d).add_(t, alpha=1-d)`,
        #1855 `train_model`), not lerp's. fp32(d) + fp32(1-d) is not 1, so this average settles at w times
        1 + 4.4e-6 at d = 0.9965, and the exported weights carry that scale as the records' do."""
        live = [t.detach().float() for t in self._live(model)]  # .float() is exact for bf16 and a no-op for fp32
        shadow = list(self.shadow.values())
        torch._foreach_mul_(shadow, self.decay)
        torch._foreach_add_(shadow, live, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into `model` (cast to each tensor's own dtype)."""
        for t, e in zip(self._live(model), self.shadow.values()):
            t.copy_(e)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        self.decay = state["decay"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
