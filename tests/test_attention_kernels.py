"""FlashAttention 3 and 2 as pgolf calls them, on the CPU: stand-in modules with the real signatures
(pgolf.model.flash_ref) in sys.modules, checked against SDPA. The kernel preference (FA3, FA2, flex,
SDPA) and the record of the kernel that ran. A slip in the call convention fails here, not on a GPU."""
from __future__ import annotations

import sys

import pytest
import torch

from model_helpers import BOS, max_diff, one_thread, tiny_model, tokens  # noqa: F401  (one_thread: autouse)
from pgolf.data.segments import segment_ids
from pgolf.model import attention
from pgolf.model.attention import attend, prepare_doc_mask, resolve_backend
from pgolf.model.flash_ref import installed, module

VERSIONS = ["fa3", "fa3-tuple", "fa2"]  # FA3 as released, the 2024 FA3 beta ((out, lse) tuples), FA2


@pytest.fixture
def standin(monkeypatch, request):
    """The stand-in `request.param` in sys.modules for one test; yields pgolf's kernel name for it."""
    with installed(request.param) as kernel:
        yield kernel


def _qkv(H, Hkv, B=2, T=48, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv)]


def _ids(B, T, max_len=0):
    idx = torch.randint(2, 100, (B, T), generator=torch.Generator().manual_seed(5))
    idx[0, [0, 7, 8, 30]] = BOS  # a one-token document included
    idx[1, [20]] = BOS  # row 1 starts inside a document
    return segment_ids(idx, BOS, max_len)


def test_kernel_preference_fa3_then_fa2_then_flex_then_sdpa(monkeypatch):
    """auto and flash take FA3 when both FlashAttentions are there; each falls back in that order."""
    monkeypatch.setattr(attention, "_installed", lambda name: name in sys.modules)
    for name in ("flash_attn_interface", "flash_attn"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", object())
    assert [resolve_backend(r, "cuda") for r in ("auto", "flash", "fa3", "fa2")] == ["flex"] * 4
    monkeypatch.setitem(sys.modules, "flash_attn", module("fa2"))
    assert [resolve_backend(r, "cuda") for r in ("auto", "flash", "fa3", "fa2")] == ["fa2"] * 4
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module("fa3"))
    assert [resolve_backend(r, "cuda") for r in ("auto", "flash", "fa3", "fa2", "flex", "sdpa")] == \
        ["fa3", "fa3", "fa3", "fa2", "flex", "sdpa"]
    assert {resolve_backend(r, "cpu") for r in attention.BACKENDS} == {"sdpa"}  # the CPU: SDPA, always


@pytest.mark.parametrize("standin", VERSIONS, indirect=True)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("rows", ["causal", "documents", "packed"])
def test_flash_call_convention_matches_sdpa(standin, H, Hkv, rows):
    """bf16 through the stand-in (dense causal, doc-masked rows, a packed row with cu_seqlens padded to
    64 entries) = fp32 SDPA on the same segments, output and gradients, whatever the return type."""
    q, k, v = _qkv(H, Hkv)
    if rows == "causal":
        mask_fa = mask_ref = None
    else:
        max_len = 16 if rows == "packed" else 0
        ids = _ids(2, 48, max_len)
        mask_fa, mask_ref = prepare_doc_mask(ids, standin, max_len), prepare_doc_mask(ids, "sdpa", max_len)
        assert mask_fa.plan[0].numel() == (64 if rows == "packed" else len(torch.unique_consecutive(ids[0])) +
                                           len(torch.unique_consecutive(ids[1])) + 1)
    leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    y = attend(*leaves, doc_ids=mask_fa, backend=standin)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attend(*ref_leaves, doc_ids=mask_ref, backend="sdpa")
    assert y.shape == ref.shape == q.shape and y.dtype == torch.bfloat16
    assert max_diff(y, ref) < 3e-2
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y.float() * w).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * w).sum(), ref_leaves)
    assert max(max_diff(a, b) / b.abs().max().item() for a, b in zip(grads, grads_ref)) < 3e-2


@pytest.mark.parametrize("standin", ["fa3"], indirect=True)
def test_a_slip_in_the_call_fails_on_the_cpu(standin):
    """What the real kernels reject, the stand-ins reject: fp32 inputs, a positional argument in FA2's
    dropout slot or FA3's seqused slot, int64 or short cu_seqlens, a max_seqlen below a segment."""
    import flash_attn_interface as fa3

    from pgolf.model.flash_ref import module

    q, k, v = (t.bfloat16() for t in _qkv(4, 2))
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        attend(q.float(), k.float(), v.float(), doc_ids=None, backend=standin)
    flat = [t.reshape(96, -1, 16) for t in (q, k, v)]
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    with pytest.raises(TypeError, match="seqused_q"):  # the FA2 positional convention on FA3
        fa3.flash_attn_varlen_func(*flat, cu, cu, 56, 56, True)
    with pytest.raises(TypeError, match="dropout_p"):  # ... and FA3-style positional causal on FA2
        module("fa2").flash_attn_varlen_func(*flat, cu, cu, 56, 56, True)
    cu64 = cu.long()
    with pytest.raises(RuntimeError, match="int32"):
        fa3.flash_attn_varlen_func(*flat, cu_seqlens_q=cu64, cu_seqlens_k=cu64, max_seqlen_q=56, max_seqlen_k=56,
                                   causal=True)
    with pytest.raises(RuntimeError, match="longer than max_seqlen"):
        fa3.flash_attn_varlen_func(*flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=48, max_seqlen_k=48,
                                   causal=True)
    short = torch.tensor([0, 40], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="token count"):
        fa3.flash_attn_varlen_func(*flat, cu_seqlens_q=short, cu_seqlens_k=short, max_seqlen_q=56,
                                   max_seqlen_k=56, causal=True)


@pytest.mark.parametrize("standin", ["fa3-tuple", "fa2"], indirect=True)
@pytest.mark.parametrize("preset", ["baseline", "pr1855"])
def test_model_on_flash_under_bf16_autocast_tracks_fp32_sdpa(standin, preset):
    """The whole forward (pr1855: packed-row doc masks, looping, gates) on the stand-in kernel under
    bf16 autocast, against the fp32 SDPA model: the loss within bf16 noise."""
    idx = tokens(1, 96, seed=3, bos_at=(0, 20, 21, 60))
    tgt = tokens(1, 96, seed=4)
    ref = tiny_model(preset, "train.train_seq_len=32")
    model = tiny_model(preset, "train.train_seq_len=32")
    model.attention_backend = standin
    with torch.no_grad():
        want = ref(idx, tgt).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(idx, tgt).item()
    assert abs(got - want) < 2e-2 * abs(want)
