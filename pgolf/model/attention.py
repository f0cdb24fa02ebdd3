"""Causal attention with optional document masking, through the fastest backend present.

Backends, in order of preference on CUDA: flash-attn (varlen kernel for document masking),
FlexAttention (block mask from segment ids), PyTorch SDPA. On the CPU: SDPA, exact, with an explicit
boolean mask when documents are masked in fixed rows, or one causal call per group of equal-length
segments for packed rows (`max_len` > 0: a (T, T) mask of a 98,304-token row would not fit). The
backend that ran is recorded in the run (`env.json`, `result.json`) so a number can always be
traced to its kernel. Segment ids come from `pgolf.data.segments`.

Layout everywhere: q (B, T, H, D), k and v (B, T, Hkv, D) -> y (B, T, H, D).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "flex", "sdpa")


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def flex_attention_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend that will run for `requested` on `device` (auto picks the fastest present)."""
    device = torch.device(device)
    if requested not in BACKENDS:
        from pgolf.errors import PgolfError
        raise PgolfError(f"train.attention_backend: unknown backend {requested!r} (choose from {BACKENDS})")
    if device.type != "cuda":
        return "sdpa"  # the exact CPU path; flash and flex kernels need a GPU
    if requested == "auto":
        if flash_attn_available():
            return "flash"
        return "flex" if flex_attention_available() else "sdpa"
    if requested == "flash" and not flash_attn_available():
        return "flex" if flex_attention_available() else "sdpa"
    return requested


@dataclass
class DocMask:
    """Document segmentation prepared once per forward in the form its backend takes, so the layers
    (17 of them with looping) share one mask instead of each rebuilding it."""
    backend: str
    plan: Any  # sdpa: (B, 1, T, T) bool mask or a SegmentPlan; flex: a BlockMask; flash: (cu_seqlens, max_seqlen)


@dataclass
class SegmentPlan:
    """Packed rows on SDPA: the segments grouped by length, each group one batched causal call."""
    groups: list[torch.Tensor]  # (n, L) flat positions (b * T + t) of the n segments of length L
    inverse: torch.Tensor  # (B*T,) index of each flat position in the concatenated group outputs


def _flat_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Flat positions (int64) where a segment starts: every row start and every change of segment id."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.nonzero(starts.flatten(), as_tuple=False).flatten()


def _segment_plan(doc_ids: torch.Tensor) -> SegmentPlan:
    n = doc_ids.numel()
    starts = _flat_starts(doc_ids)
    lens = torch.diff(starts, append=starts.new_tensor([n]))
    groups = [starts[lens == L][:, None] + torch.arange(L, device=starts.device)
              for L in torch.unique(lens).tolist()]
    perm = torch.cat([g.flatten() for g in groups])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)
    return SegmentPlan(groups, inverse)


def prepare_doc_mask(doc_ids: torch.Tensor, backend: str, max_len: int = 0) -> DocMask:
    """`doc_ids` (B, T) segment ids; `max_len` > 0 bounds every segment (packed rows, `varlen`)."""
    B, T = doc_ids.shape
    if backend == "flash":
        cu = torch.cat([_flat_starts(doc_ids), doc_ids.new_tensor([B * T], dtype=torch.int64)]).to(torch.int32)
        if max_len > 0:  # packed rows: padded with empty segments to a multiple of 64 entries, as the records,
            cu = F.pad(cu, (0, -cu.numel() % 64), value=B * T)  # so a compiled graph sees few shapes
        return DocMask(backend, (cu, min(T, max_len) if max_len > 0 else T))  # a bound: no host sync
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])
        # eager create_block_mask materialises the (T, T) mask: compiled for packed rows (T = 98,304)
        eager = max_len == 0 or torch.compiler.is_compiling()
        make = create_block_mask if eager else _compiled_create_block_mask()
        return DocMask(backend, make(mask_mod, B, None, T, T, device=doc_ids.device))
    if max_len > 0:
        return DocMask(backend, _segment_plan(doc_ids))
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return DocMask(backend, ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None])  # (B, 1, T, T)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    return torch.compile(create_block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | DocMask | None,
           backend: str) -> torch.Tensor:
    """Causal attention; `doc_ids` (raw segment ids or a prepared DocMask) keeps it inside documents."""
    mask = prepare_doc_mask(doc_ids, backend) if isinstance(doc_ids, torch.Tensor) else doc_ids
    if backend == "flash":
        return _flash(*_autocast_inputs(q, k, v), mask)
    if backend == "flex":
        return _flex(*_autocast_inputs(q, k, v), mask)
    return _sdpa(q, k, v, mask)


def _autocast_inputs(q, k, v):
    """q, k, v in one dtype for the kernels that autocast does not cover (flash-attn, FlexAttention).

    SDPA is an autocast op: under autocast it casts all three to the autocast dtype itself. The other
    kernels are not, and under autocast q and k can leave the QK RMSNorm in another dtype than v leaves
    its Linear; they get the cast SDPA would have made (outside autocast nothing changes).
    """
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def _sdpa(q, k, v, mask: DocMask | None):
    B, T, H, D = q.shape
    gqa = {"enable_gqa": True} if k.shape[2] != H else {}
    if mask is not None and isinstance(mask.plan, SegmentPlan):
        return _sdpa_segments(q, k, v, mask.plan, gqa)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if mask is None:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **gqa)
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.plan, **gqa)
    return y.transpose(1, 2)


def _sdpa_segments(q, k, v, plan: SegmentPlan, gqa: dict):
    """Exact causal attention inside each segment: segments of one length are stacked into one call."""
    B, T, H, D = q.shape
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
    outs = []
    for idx in plan.groups:  # idx (n, L)
        y = F.scaled_dot_product_attention(qf[idx].transpose(1, 2), kf[idx].transpose(1, 2),
                                           vf[idx].transpose(1, 2), is_causal=True, **gqa)  # (n, H, L, D)
        outs.append(y.transpose(1, 2).reshape(-1, H, D))
    return torch.cat(outs)[plan.inverse].view(B, T, H, D)


# ---- FlexAttention (CUDA): a block mask built from document ids, compiled once per shape.
_compiled_flex = None


def _flex(q, k, v, mask: DocMask | None):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    B, T, H, D = q.shape
    block_mask = _cached_causal_mask(T, q.device) if mask is None else mask.plan
    y = _compiled_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=k.shape[2] != H)
    return y.transpose(1, 2)


@functools.lru_cache(maxsize=8)
def _cached_causal_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=device)


# ---- flash-attn (CUDA, when installed): varlen kernel over the segments of the flattened rows.
def _flash(q, k, v, mask: DocMask | None):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, T, H, D = q.shape
    if mask is None:
        return flash_attn_func(q, k, v, causal=True)
    cu, max_len = mask.plan
    y = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                               cu, cu, max_len, max_len, causal=True)
    return y.view(B, T, H, D)
