"""CPU stand-ins for FlashAttention 3 (`flash_attn_interface`) and flash-attn 2 (`flash_attn`).

Each stand-in module has the public functions pgolf calls with the parameter lists of the real ones
(Dao-AILab/flash-attention: hopper/flash_attn_interface.py for FA3, as released and in the 2024 beta
that returned (out, softmax_lse) tuples; flash_attn/flash_attn_interface.py for FA2, whose varlen
function takes dropout_p where FA3 takes seqused_q). They check what the kernels require (fp16/bf16,
one dtype, the layouts, int32 cu_seqlens from 0 to the token count, segments within max_seqlen) and
compute with SDPA, segment by segment. Like the real kernels, the computation is a torch.library custom
op with a fake (shape-only) form and a registered backward, so torch.compile treats it as one opaque op.

They let the CPU run pgolf's FlashAttention calls: tests/test_attention_kernels.py checks the call
convention against SDPA, and the compile check (pgolf.model.compile_check, `pgolf plan`) traces the
training and TTT steps through the kernel an H100 runs. `installed(version)` puts one in sys.modules
while no real one is importable.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils.flop_counter import register_flop_formula


def _check_cu(cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    lens = torch.diff(cu)
    if cu.dtype != torch.int32 or cu.ndim != 1:
        raise RuntimeError("cu_seqlens must have dtype int32 and one dimension")
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens < 0).any()):
        raise RuntimeError(f"cu_seqlens must rise from 0 to the token count {total}")
    if int(lens.max()) > max_seqlen:
        raise RuntimeError(f"a segment of {int(lens.max())} tokens is longer than max_seqlen {max_seqlen}")


def _allowed(cu: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    """(N, N) bool: key j is visible to query i (same segment of cu_seqlens, and j <= i when causal)."""
    pos = torch.arange(n, device=cu.device)
    seg = torch.searchsorted(cu.long(), pos, right=True)  # empty segments own no position
    allowed = seg[:, None] == seg[None, :]
    return allowed & (pos[None, :] <= pos[:, None]) if causal else allowed


def _probs(q, k, cu, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (H, N, N) in fp32 over the allowed keys, and k repeated to q's heads."""
    kh = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)  # (N, H, D)
    s = torch.einsum("qhd,khd->hqk", q.float(), kh) * scale
    return s.masked_fill(~_allowed(cu, q.shape[0], causal), float("-inf")).softmax(-1), kh


def _segments(q, k, v, cu, causal: bool, scale: float) -> torch.Tensor:
    """Attention within each segment [cu[i], cu[i+1]) of the flattened tokens (q (N, H, D)), in fp32."""
    p, _ = _probs(q, k, cu, causal, scale)
    vh = v.float().repeat_interleave(q.shape[1] // v.shape[1], 1)
    return torch.einsum("hqk,khd->qhd", p, vh).to(q.dtype).contiguous()  # contiguous, as the kernel's


@torch.library.custom_op("pgolf_ref::varlen_attn", mutates_args=())
def varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
                causal: bool, scale: float) -> torch.Tensor:
    _check_cu(cu, q.shape[0], max_seqlen)
    return _segments(q, k, v, cu, causal, scale)


@varlen_attn.register_fake
def _(q, k, v, cu, max_seqlen, causal, scale):
    return torch.empty_like(q)


@torch.library.custom_op("pgolf_ref::varlen_attn_bwd", mutates_args=())
def varlen_attn_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                    max_seqlen: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `varlen_attn`, written out (a custom op runs below autograd)."""
    N, H, D = q.shape
    group = H // k.shape[1]
    p, kh = _probs(q, k, cu, causal, scale)
    vh = v.float().repeat_interleave(group, 1)
    gf = g.float()
    dp = torch.einsum("qhd,khd->hqk", gf, vh)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.einsum("hqk,khd->qhd", ds, kh) * scale
    dk = (torch.einsum("hqk,qhd->khd", ds, q.float()) * scale).view(N, -1, group, D).sum(2)
    dv = torch.einsum("hqk,qhd->khd", p, gf).view(N, -1, group, D).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@varlen_attn_bwd.register_fake
def _(g, q, k, v, cu, max_seqlen, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen, causal, scale = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale


def _backward(ctx, g):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = varlen_attn_bwd(g, q, k, v, cu, ctx.max_seqlen, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


varlen_attn.register_autograd(_backward, setup_context=_setup)


def _check_inputs(q, k, v, ndim: int) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key/value must have the same dtype")
    if q.ndim != ndim or k.ndim != ndim or v.ndim != ndim:
        raise RuntimeError(f"q, k, v must have {ndim} dimensions")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise RuntimeError("k, v must match and the heads of q be a multiple of theirs")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise RuntimeError("input tensor must have contiguous last dimension")


def _check_scalars(softmax_scale, causal, max_seqlen=1) -> None:
    if not isinstance(causal, bool) or not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
        raise TypeError(f"causal must be a bool and max_seqlen an int (got {causal!r}, {max_seqlen!r})")
    if softmax_scale is not None and not isinstance(softmax_scale, float):
        raise TypeError(f"softmax_scale must be a float or None (got {softmax_scale!r})")


def _dense(q, k, v, softmax_scale, causal):
    """(B, T, H, D) -> (B, T, H, D): every row one segment."""
    _check_inputs(q, k, v, 4)
    _check_scalars(softmax_scale, causal)
    B, T, H, D = q.shape
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    y = varlen_attn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D), cu, T, causal,
                    softmax_scale or D ** -0.5)
    return y.view(B, T, H, D)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    _check_inputs(q, k, v, 3)
    _check_scalars(softmax_scale, causal, max_seqlen_q)
    if cu_seqlens_q is not cu_seqlens_k or max_seqlen_q != max_seqlen_k:
        raise NotImplementedError("the stand-in covers self-attention only (one cu_seqlens for q and k)")
    if k.shape[0] != q.shape[0]:
        raise RuntimeError("q and k must hold the same tokens in self-attention")
    return varlen_attn(q, k, v, cu_seqlens_q, max_seqlen_q, causal, softmax_scale or q.shape[-1] ** -0.5)


def _none(**given) -> None:
    for name, value in given.items():
        if value is not None:
            raise TypeError(f"the stand-in does not take {name}={value!r} (pgolf never passes it)")


def _defaults(**given) -> None:
    """The stand-ins compute plain (varlen) causal or full attention: any other option is a slip."""
    defaults = {"window_size": (-1, -1), "softcap": 0.0, "dropout_p": 0.0}
    for name, value in given.items():
        if value != defaults.get(name) or type(value) is not type(defaults.get(name)):
            raise TypeError(f"the stand-in does not take {name}={value!r} (pgolf never passes it)")


def _lse(q: torch.Tensor) -> torch.Tensor:
    """A softmax_lse-shaped placeholder (B, H, T) or (H, N): pgolf must never read it."""
    shape = (q.shape[0], q.shape[2], q.shape[1]) if q.ndim == 4 else (q.shape[1], q.shape[0])
    return torch.full(shape, float("nan"), device=q.device)


# ---- FlashAttention 3 as released (hopper/flash_attn_interface.py): out, or (out, lse) on request
def fa3_flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    _none(qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, pack_gqa=pack_gqa)
    _defaults(window_size=window_size, softcap=softcap)
    out = _dense(q, k, v, softmax_scale, causal)
    return (out, _lse(q)) if return_attn_probs else out


def fa3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
                               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                               return_attn_probs=False):
    _none(seqused_q=seqused_q, seqused_k=seqused_k, qv=qv, q_descale=q_descale, k_descale=k_descale,
          v_descale=v_descale, pack_gqa=pack_gqa)
    _defaults(window_size=window_size, softcap=softcap)
    out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return (out, _lse(q)) if return_attn_probs else out


# ---- the 2024 FA3 beta: always (out, softmax_lse)
def fa3_beta_flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                             v_descale=None, window_size=(-1, -1), sink_token_length=0, softcap=0.0, num_splits=1,
                             pack_gqa=None, deterministic=False):
    _none(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, pack_gqa=pack_gqa)
    _defaults(window_size=window_size, softcap=softcap)
    return _dense(q, k, v, softmax_scale, causal), _lse(q)


def fa3_beta_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                                    v_descale=None, window_size=(-1, -1), softcap=0.0, num_splits=1, pack_gqa=None,
                                    deterministic=False):
    _none(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, pack_gqa=pack_gqa)
    _defaults(window_size=window_size, softcap=softcap)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal), _lse(q)


# ---- flash-attn 2 (flash_attn/flash_attn_interface.py): dropout_p comes right after the shapes
def fa2_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _none(alibi_slopes=alibi_slopes)
    _defaults(dropout_p=dropout_p, window_size=window_size, softcap=softcap)
    out = _dense(q, k, v, softmax_scale, causal)
    return (out, _lse(q), None) if return_attn_probs else out


def fa2_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
    _none(alibi_slopes=alibi_slopes, block_table=block_table)
    _defaults(dropout_p=dropout_p, window_size=window_size, softcap=softcap)
    out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return (out, _lse(q), None) if return_attn_probs else out


VERSIONS = {
    "fa3": ("flash_attn_interface", fa3_flash_attn_func, fa3_flash_attn_varlen_func),
    "fa3-tuple": ("flash_attn_interface", fa3_beta_flash_attn_func, fa3_beta_flash_attn_varlen_func),
    "fa2": ("flash_attn", fa2_flash_attn_func, fa2_flash_attn_varlen_func),
}


def module(version: str) -> types.ModuleType:
    name, func, varlen = VERSIONS[version]
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(flash_attn_func=func, flash_attn_varlen_func=varlen)
    return mod


@contextlib.contextmanager
def installed(version: str) -> Iterator[str]:
    """The stand-in `version` imported under the real module name for a while (shadowing a real one:
    the stand-ins take CPU tensors); yields the kernel name pgolf uses ("fa3" or "fa2")."""
    from pgolf.model import attention

    name = VERSIONS[version][0]
    before = sys.modules.get(name)
    sys.modules[name] = module(version)
    attention._installed.cache_clear()
    try:
        yield "fa2" if version == "fa2" else "fa3"
    finally:
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before
        attention._installed.cache_clear()


# ---- FLOPs (torch.utils.flop_counter): what a FlashAttention kernel computes, 2 matmuls over the
# allowed (query, key) pairs forward and twice that backward (the convention of 6N per token)
def _pairs(cu: torch.Tensor, n: int, max_seqlen: int, causal: bool) -> int:
    """Allowed pairs; under FakeTensorMode (no values) every segment is taken max_seqlen long."""
    if isinstance(cu, FakeTensor):
        full, rest = divmod(n, max_seqlen)
        lens = [max_seqlen] * full + [rest]
    else:
        with unset_fake_temporarily():  # a real cu_seqlens read inside a fake-mode trace
            lens = torch.diff(cu.long()).tolist()
    return sum(L * (L + 1) // 2 if causal else L * L for L in lens)


@register_flop_formula(torch.ops.pgolf_ref.varlen_attn, get_raw=True)
def _flops_fwd(q, k, v, cu, max_seqlen, causal, scale, *args, **kwargs) -> int:
    return 4 * q.shape[1] * q.shape[2] * _pairs(cu, q.shape[0], max_seqlen, causal)


@register_flop_formula(torch.ops.pgolf_ref.varlen_attn_bwd, get_raw=True)
def _flops_bwd(g, q, k, v, cu, max_seqlen, causal, scale, *args, **kwargs) -> int:
    return 8 * q.shape[1] * q.shape[2] * _pairs(cu, q.shape[0], max_seqlen, causal)
