"""The optimizer split (docs/records/record-stack.md §3.2; docs/records/hedge-stack.md §1.3) and the `OptimizerSet` the
trainer steps.

  muon    2-D (or higher) weight matrices: the blocks' projections and, as in the #688 family,
          other projections such as the BigramHash / value-embedding `proj`
  embed   embedding tables: `tok_emb` and any other `nn.Embedding` (bigram, VE tables)
  head    the untied `lm_head.weight`
  scalar  ndim < 2, or a control-pattern name (gates, scales, mixes, lambdas), even when 2-D
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pgolf.config import OptimConfig
from pgolf.model.gpt import CONTROL_PATTERNS, is_control  # noqa: F401 (re-exported)
from pgolf.optim.muon import Muon
from pgolf.optim.schedule import momentum_at

GROUPS = ("muon", "embed", "head", "scalar")

Named = list[tuple[str, nn.Parameter]]


def classify_params(model: nn.Module) -> dict[str, Named]:
    """Trainable parameters of `model` by optimizer group (every one in exactly one group).

    A parameter may carry `optim_group = "<group>"` as an attribute to override the name rules.
    """
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, Named] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        group = getattr(p, "optim_group", None)
        if group is None:
            if p.ndim < 2 or is_control(name):
                group = "scalar"
            elif id(p) in embed_ids or name.split(".")[0] == "tok_emb":
                group = "embed"
            elif name.split(".")[0] == "lm_head":
                group = "head"
            else:
                group = "muon"
        if group not in out:
            raise ValueError(f"{name}: unknown optim_group {group!r} (choose from {', '.join(GROUPS)})")
        out[group].append((name, p))
    return out


class OptimizerSet:
    """Muon for the matrices + one AdamW with a param group per other group.

    `step(lr_mult, step)` sets every group's lr to base_lr * lr_mult and the Muon momentum
    warm-up, then steps everything.
    """

    def __init__(self, groups: dict[str, Named], optimizers: dict[str, torch.optim.Optimizer],
                 cfg: OptimConfig):
        self.groups = groups
        self.optimizers = optimizers
        self.cfg = cfg

    def reduce_and_clip(self, max_norm: float) -> torch.Tensor:
        """Average the gradients over ranks and clip their L2 norm (GRAD_CLIP_NORM; 0 = off).

        Muon's matrices are reduce-scattered (each rank gets the averaged rows it updates: Parallel
        Muon, pgolf.optim.muon); every other gradient is all-reduced. With `optim.grad_clip_scope`
        "global" the norm is the norm of the whole averaged gradient (the shards' squares summed over
        ranks), so the clip is the single-process clip; with "rank" each rank clips its own gradient
        before the average, as the #1530-line records (`clip_grad_norm_` on the local gradients, which
        their optimizers all-reduce afterwards). Returns the pre-clip norm (of the averaged gradient,
        or of this rank's own) as a 0-d tensor (no host sync). `optim.grad_reduce_bf16`: Muon's gradients
        are cast to bf16 and reduced in bf16, a bf16 gradient (tok_emb) in bf16, the rest in fp32."""
        from pgolf import distributed

        muon = self.optimizers.get("muon")
        others = [p.grad for k, opt in self.optimizers.items() if k != "muon"
                  for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if self.cfg.grad_clip_scope == "rank":  # the records' own call, on this rank's gradients
            local = [p for ps in self.groups.values() for _, p in ps if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(local, max_norm) if max_norm > 0 else torch.zeros(())
            if isinstance(muon, Muon):
                muon.reduce_grads()
            distributed.all_reduce_mean_(others, per_dtype=self.cfg.grad_reduce_bf16)
            return norm
        if isinstance(muon, Muon):
            muon.reduce_grads()
        distributed.all_reduce_mean_(others, per_dtype=self.cfg.grad_reduce_bf16)
        if max_norm <= 0:
            return torch.zeros(())
        dev = next(p.device for ps in self.groups.values() for _, p in ps)
        sq = sum((n.float() ** 2 for n in torch._foreach_norm(others)), torch.zeros((), device=dev))
        if isinstance(muon, Muon):
            shards = muon.shard_sq_norm()
            distributed.all_reduce_sum_([shards])
            sq = sq + shards
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        if others:
            torch._foreach_mul_(others, coef)
        if isinstance(muon, Muon):
            muon.scale_grads_(coef)
        return norm

    def step(self, lr_mult: float = 1.0, step: int = 0) -> None:
        mu = momentum_at(step, self.cfg)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
                if isinstance(opt, Muon):
                    g["momentum"] = mu
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """A deep copy, so a snapshot taken before compile warm-up survives the warm-up steps."""
        return {k: copy.deepcopy(opt.state_dict()) for k, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict, keep_muon_momentum: bool = False) -> None:
        """Load `state`; `keep_muon_momentum` keeps Muon's current momentum buffers instead of the
        state's (the #1530-line records' sharded Muon after the warm-up, `optim.muon_warmup_momentum`)."""
        if set(state) != set(self.optimizers):
            raise KeyError(f"optimizer state has {sorted(state)}, expected {sorted(self.optimizers)}")
        muon = self.optimizers.get("muon")
        kept = {p: st["momentum_buffer"] for p, st in muon.state.items() if "momentum_buffer" in st} \
            if keep_muon_momentum and muon is not None else {}
        for k, opt in self.optimizers.items():
            opt.load_state_dict(copy.deepcopy(state[k]))
        for p, buf in kept.items():
            muon.state[p]["momentum_buffer"] = buf  # type: ignore[union-attr]

    def summary(self, numel: bool = False) -> dict[str, int]:
        """Group -> number of parameter tensors (or of elements with numel=True), for logs."""
        return {g: sum(p.numel() if numel else 1 for _, p in ps) for g, ps in self.groups.items() if ps}

    def lrs(self) -> dict[str, float]:
        """Current lr of each group (after the last `step`)."""
        return {g["name"]: g["lr"] for opt in self.optimizers.values() for g in opt.param_groups}


def build_optimizers(model: nn.Module, cfg: OptimConfig, tied: bool, compile_ns: str | None = None) -> OptimizerSet:
    """Muon for the matrices (Newton-Schulz compiled with backend `compile_ns`, or eager) and AdamW."""
    groups = classify_params(model)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if groups["muon"]:
        optimizers["muon"] = Muon(
            [{"params": [p for _, p in groups["muon"]], "name": "muon", "base_lr": cfg.matrix_lr}],
            lr=cfg.matrix_lr, momentum=momentum_at(0, cfg), nesterov=True, weight_decay=cfg.muon_wd,
            backend_steps=cfg.muon_backend_steps, coeffs=cfg.muon_coeffs,
            row_normalize=cfg.muon_row_normalize, momentum_dtype=torch.bfloat16 if cfg.muon_momentum_bf16 else None,
            reduce_dtype=torch.bfloat16 if cfg.grad_reduce_bf16 else None, compile_ns=compile_ns)
    # (group, base lr, decoupled wd). The records' untied head uses plain Adam: no weight decay.
    adam_spec = [
        ("embed", cfg.tied_embed_lr if tied else cfg.embed_lr, cfg.embed_wd),
        ("head", cfg.head_lr, 0.0),
        ("scalar", cfg.scalar_lr, cfg.adam_wd),
    ]
    adam_groups: list[dict[str, Any]] = [{"params": [p for _, p in groups[g]], "name": g, "base_lr": lr, "lr": lr,
                    "weight_decay": wd} for g, lr, wd in adam_spec if groups[g]]
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        optimizers["adam"] = torch.optim.AdamW(
            adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True if on_cuda else None)
    return OptimizerSet(groups, optimizers, cfg)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 clip over all parameters (GRAD_CLIP_NORM; 0 = off, returning a zero norm).

    Returns the pre-clip norm as a 0-d tensor: no device sync until the caller logs it.
    """
    if max_norm <= 0:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
