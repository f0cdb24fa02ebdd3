"""Causal attention with optional document masking, through the fastest backend present.

Backends, in order of preference on CUDA: flash-attn (varlen kernel for document masking),
FlexAttention (block mask from document ids), PyTorch SDPA. On the CPU: SDPA, exact, with an explicit
boolean mask when documents are masked. The backend that ran is recorded in the run (`env.json`,
`result.json`) so a number can always be traced to its kernel.

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


def doc_ids_from_tokens(idx: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Segment id of every position: a new segment starts at each BOS (and at each row start)."""
    return (idx == bos_id).cumsum(dim=1, dtype=torch.int32)  # (B, T)


@dataclass
class DocMask:
    """Document segmentation prepared once per forward in the form its backend takes, so the layers
    (17 of them with looping) share one mask instead of each rebuilding it."""
    backend: str
    plan: Any  # sdpa: (B, 1, T, T) bool mask; flex: a BlockMask; flash: (cu_seqlens, max_seqlen)


def prepare_doc_mask(doc_ids: torch.Tensor, backend: str) -> DocMask:
    B, T = doc_ids.shape
    if backend == "flash":
        # segment starts: every row start and every position where the segment id changes
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        pos = torch.nonzero(starts.flatten(), as_tuple=False).flatten().to(torch.int32)
        cu = torch.cat([pos, torch.tensor([B * T], dtype=torch.int32, device=doc_ids.device)])
        return DocMask(backend, (cu, T))  # T bounds every segment: no host sync for the true maximum
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])
        return DocMask(backend, create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device))
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return DocMask(backend, ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None])  # (B, 1, T, T)


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
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = {"enable_gqa": True} if k.shape[2] != H else {}
    if mask is None:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **gqa)
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.plan, **gqa)
    return y.transpose(1, 2)


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
