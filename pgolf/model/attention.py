"""Causal attention with optional document masking, through the fastest kernel present.

Kernels, in order of preference on CUDA (docs/records/record-stack.md §1.5, §3.7: the records call FA3 directly):
  fa3   FlashAttention-3 (`flash_attn_interface`, the Hopper build the records run)
  fa2   flash-attn 2 (`flash_attn`)
  flex  FlexAttention (a block mask from segment ids)
  sdpa  PyTorch SDPA
Both FlashAttention versions take packed rows through their varlen kernel (cu_seqlens / max_seqlen,
by keyword: FA2 and FA3 order the later positional arguments differently) and may return the output
alone or an (out, softmax_lse) tuple depending on the release; `_flash` takes the output either way.
tests/flash_standins.py holds stand-ins with the real signatures, so the call convention is tested on
the CPU. On the CPU the kernel is always SDPA, exact: with an explicit boolean mask when documents are
masked in fixed rows, or one causal call per group of equal-length segments for packed rows
(`max_len` > 0: a (T, T) mask of a 98,304-token row would not fit). The kernel that ran is recorded in
the run (`env.json`, `result.json`), so a number can always be traced to it. Segment ids come from
`pgolf.data.segments`.

Layout everywhere: q (B, T, H, D), k and v (B, T, Hkv, D) -> y (B, T, H, D).
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

KERNELS = ("fa3", "fa2", "flex", "sdpa")
# what train.attention_backend may ask for: a kernel, "flash" (FA3, else FA2) or "auto" (the first present)
BACKENDS = ("auto", "flash", *KERNELS)
_FALLBACKS = {"auto": KERNELS, "flash": KERNELS, "fa3": KERNELS, "fa2": KERNELS[1:], "flex": KERNELS[2:],
              "sdpa": KERNELS[3:]}
FLASH_MODULES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}


@functools.cache
def _installed(module: str) -> bool:
    """Whether `module` imports: a flash-attn wheel built for another torch or CUDA is found but fails to
    load (an undefined symbol), and the next kernel of the fallbacks must run instead."""
    if module in sys.modules:
        return True
    try:
        if importlib.util.find_spec(module) is None:
            return False
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def kernel_available(kernel: str) -> bool:
    """Whether `kernel` can run on CUDA here (its package installed; SDPA always)."""
    if kernel in FLASH_MODULES:
        return _installed(FLASH_MODULES[kernel])
    if kernel == "flex":
        return _installed("torch.nn.attention.flex_attention")
    return kernel == "sdpa"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The kernel that will run for `requested` on `device`: the first available of its fallbacks."""
    device = torch.device(device)
    if requested not in BACKENDS:
        from pgolf.errors import PgolfError
        raise PgolfError(f"train.attention_backend: unknown backend {requested!r} (choose from {BACKENDS})")
    if device.type != "cuda":
        return "sdpa"  # the exact CPU path; the other kernels need a GPU
    return next(k for k in _FALLBACKS[requested] if kernel_available(k))


@dataclass
class DocMask:
    """Document segmentation prepared once per forward in the form its kernel takes, so the layers
    (17 of them with looping) share one mask instead of each rebuilding it. `plan` None: plain causal
    attention (each row one document, as in LoRA TTT)."""
    backend: str
    plan: Any  # sdpa: (B, 1, T, T) bool mask or a SegmentPlan; flex: a BlockMask; fa3/fa2: (cu_seqlens, max_seqlen)


CAUSAL = DocMask("any", None)  # rows that are single documents: no cut inside a row


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
    if backend in FLASH_MODULES:
        cu = torch.cat([_flat_starts(doc_ids), doc_ids.new_tensor([B * T], dtype=torch.int64)]).to(torch.int32)
        if max_len > 0:  # packed rows: padded with empty segments to a multiple of 64 entries, as the records,
            cu = F.pad(cu, (0, -cu.numel() % 64), value=B * T)  # so a compiled graph sees few shapes
        return DocMask(backend, (cu, min(T, max_len) if max_len > 0 else T))  # a bound: no host sync
    if backend == "flex":
        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])
        return DocMask(backend, document_block_mask(doc_ids, mask_mod))
    if max_len > 0:
        return DocMask(backend, _segment_plan(doc_ids))
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return DocMask(backend, ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None])  # (B, 1, T, T)


FLEX_BLOCK = 128  # FlexAttention's block size (its default)


def document_block_mask(doc_ids: torch.Tensor, mask_mod: Any, block: int = FLEX_BLOCK):
    """The BlockMask of causal attention within segments, from the segment ids alone. Ids never decrease
    along a row (`pgolf.data.segments.segment_ids`), so kv block j <= q block i holds a pair to attend
    iff its last id reaches the q block's first id, and all its pairs attend iff j < i, the q block is
    whole (not the padded tail of a row) and the kv block's first id is the q block's last. That is
    (T / block)^2 comparisons per row where create_block_mask evaluates `mask_mod` on all T^2 pairs
    (10^10 for a 98,304-token packed row, every micro-step); `mask_mod` runs inside the partial blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc_ids.shape
    n = -(-T // block)
    ids = torch.cat([doc_ids, doc_ids[:, -1:].expand(B, n * block - T)], dim=1)  # the tail: its last id
    blocks = ids.view(B, n, block)
    first, last = blocks[..., 0], blocks[..., -1]  # (B, n) each block's smallest and largest segment id
    i = torch.arange(n, device=doc_ids.device)
    below = i[None, :] <= i[:, None]  # (q block, kv block): causal at block level
    meets = below & (last[:, None, :] >= first[:, :, None])  # (B, n, n): some pair attends
    whole = (i[None, :] < i[:, None]) & ((i[:, None] + 1) * block <= T)
    full = whole & (first[:, None, :] == last[:, :, None])  # every pair attends

    def ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # kv blocks first, in order
        num = m.sum(-1, dtype=torch.int32)[:, None].contiguous()  # (B, 1, n)
        idx = m.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx[:, None].contiguous()  # (B, 1, n, n)

    (num, idx), (full_num, full_idx) = ordered(meets & ~full), ordered(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | DocMask | None,
           backend: str) -> torch.Tensor:
    """Causal attention; `doc_ids` (raw segment ids or a prepared DocMask) keeps it inside documents."""
    mask = prepare_doc_mask(doc_ids, backend) if isinstance(doc_ids, torch.Tensor) else doc_ids
    if mask is not None and mask.plan is None:
        mask = None  # CAUSAL: plain causal attention
    if backend == "fa3":
        import flash_attn_interface as fa3
        return _flash(fa3, *_autocast_inputs(q, k, v), mask)
    if backend == "fa2":
        import flash_attn as fa2
        return _flash(fa2, *_autocast_inputs(q, k, v), mask)
    if backend == "flex":
        return _flex(*_autocast_inputs(q, k, v), mask)
    return _sdpa(q, k, v, mask)


def _autocast_inputs(q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in one dtype for the kernels that autocast does not cover (FlashAttention, FlexAttention).

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
    gqa: dict[str, Any] = {"enable_gqa": True} if k.shape[2] != H else {}
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
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask: DocMask | None):
    from torch.nn.attention.flex_attention import flex_attention

    B, T, H, D = q.shape
    block_mask = _causal_block_mask(T, q.device) if mask is None else mask.plan
    # inside a compiled model the kernel is traced with it; eager calls use its own compiled form
    fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    y = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
           enable_gqa=k.shape[2] != H)
    return y.transpose(1, 2)


def _causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if torch.compiler.is_compiling():  # traced into the graph (a static shape: no per-call cost)
        return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=device)
    return _cached_causal_mask(T, device)


@functools.lru_cache(maxsize=8)
def _cached_causal_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=device)


# ---- FlashAttention 3 or 2 (CUDA, when installed): the varlen kernel over the segments of the flattened
# rows. Both take these keywords; FA3 returns (out, softmax_lse) in some releases, FA2 and later FA3 out.
def _flash(fa, q, k, v, mask: DocMask | None):
    B, T, H, D = q.shape
    if mask is None:
        return _output(fa.flash_attn_func(q, k, v, causal=True))
    cu, max_len = mask.plan
    y = fa.flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                  cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                                  causal=True)
    return _output(y).view(B, T, H, D)


def _output(y):
    return y[0] if isinstance(y, tuple) else y
