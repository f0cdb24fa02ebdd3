"""Attention: every backend against a float64 reference with an explicit block-diagonal causal mask (GQA
included), the backend resolution, and the full attention module (QK-norm, partial/NTK RoPE, q_gain,
XSA, gates, VE) against docs/records/record-stack.md §2.4 / docs/records/hedge-stack.md §1.1, §3, §4 written out."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import BOS, max_diff, tiny_model, tokens
from pgolf.errors import PgolfError
from pgolf.data.segments import segment_ids
from pgolf.model.attention import BACKENDS, attend, prepare_doc_mask, resolve_backend

GQA_SHAPES = [(4, 2), (6, 2), (4, 4)]  # (H, Hkv): 2:1, 3:1, MHA


def reference_attention(q, k, v, doc_ids):
    """Float64 softmax(q k^T / sqrt(D) + mask) v; query head h reads KV head h // (H / Hkv)."""
    B, T, H, D = q.shape
    g = H // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :]).cpu()
    s = s.masked_fill(~allowed[:, None].to(s.device), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _qkv(B, T, H, Hkv, D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
    return (t.to(device, dtype) for t in (q, k, v))


def _packed_doc_ids(B, T, device="cpu"):
    """Rows with several BOS-started documents; row 1 starts mid-document (a prefix before its first BOS)."""
    idx = torch.randint(2, 100, (B, T), generator=torch.Generator().manual_seed(9))
    idx[0, [0, T // 5, T // 2, T // 2 + 1, T - 3]] = BOS  # includes a one-token document
    idx[1, [T // 3, 2 * T // 3]] = BOS
    return segment_ids(idx.to(device), BOS)


# ---------------------------------------------------------------- backend resolution and segments

def test_resolve_backend_is_sdpa_on_cpu_whatever_is_requested():
    """On the CPU every request resolves to the exact SDPA path; unknown names are a user error."""
    for requested in BACKENDS:
        assert resolve_backend(requested, "cpu") == "sdpa"
        assert resolve_backend(requested, torch.device("cpu")) == "sdpa"
    with pytest.raises(PgolfError, match="attention_backend"):
        resolve_backend("xformers", "cpu")


def test_doc_ids_start_a_segment_at_every_bos():
    """Segment ids count the segment starts so far: the row start and every BOS (the prefix is its own)."""
    idx = torch.tensor([[1, 5, 6, 1, 7], [4, 1, 1, 8, 9]])
    assert segment_ids(idx, BOS).tolist() == [[1, 1, 1, 2, 2], [1, 2, 3, 3, 3]]


def test_kernels_outside_autocast_get_one_autocast_dtype():
    """flash / flex are not autocast ops: under autocast q, k, v reach them in the autocast dtype; else as given."""
    from pgolf.model.attention import _autocast_inputs

    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).bfloat16()
    assert [t.dtype for t in _autocast_inputs(q, k, v)] == [torch.float32, torch.float32, torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in _autocast_inputs(q, k, v)} == {torch.bfloat16}


# ---------------------------------------------------------------- SDPA against the reference

@pytest.mark.parametrize("H,Hkv", GQA_SHAPES)
def test_sdpa_doc_masked_equals_float64_reference(H, Hkv):
    """The CPU doc-masked path is exact attention within documents (float64: 1e-12; float32: 1e-5)."""
    B, T, D = 2, 30, 8
    doc_ids = _packed_doc_ids(B, T)
    q, k, v = _qkv(B, T, H, Hkv, D, dtype=torch.float64)
    ref = reference_attention(q, k, v, doc_ids)
    assert max_diff(attend(q, k, v, doc_ids=doc_ids, backend="sdpa"), ref) < 1e-12
    y32 = attend(q.float(), k.float(), v.float(), doc_ids=doc_ids, backend="sdpa")
    assert y32.shape == (B, T, H, D) and max_diff(y32, ref) < 1e-5
    assert max_diff(y32, reference_attention(q, k, v, None)) > 1e-2  # the mask does cut something


@pytest.mark.parametrize("H,Hkv", GQA_SHAPES)
def test_sdpa_causal_equals_float64_reference(H, Hkv):
    """Without document masking the path is plain causal attention."""
    q, k, v = _qkv(2, 30, H, Hkv, 8, seed=1, dtype=torch.float64)
    assert max_diff(attend(q, k, v, doc_ids=None, backend="sdpa"), reference_attention(q, k, v, None)) < 1e-12


def test_doc_masked_path_without_bos_equals_causal_path():
    """Rows without any BOS: the doc-masked path gives the plain causal result (kernel level and model level)."""
    q, k, v = _qkv(2, 30, 4, 2, 8, seed=2)
    zeros = torch.zeros(2, 30, dtype=torch.int32)
    masked_y = attend(q, k, v, doc_ids=zeros, backend="sdpa")
    assert max_diff(masked_y, attend(q, k, v, doc_ids=None, backend="sdpa")) < 1e-6
    masked = tiny_model("pr1855")  # doc_mask on
    plain = tiny_model("pr1855", "model.doc_mask=false")
    idx = tokens()  # no BOS anywhere
    with torch.no_grad():
        assert max_diff(masked(idx), plain(idx)) < 1e-6


# ---------------------------------------------------------------- the attention module written out

def _rms64(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)


def _rope64(x, dims, base, ntk, bf16=False):
    """Rotate x[..., :dims] in pairs (i, i + dims/2) by angle t * base'^(-2i/dims); base' = base ntk^(d/(d-2)).
    `bf16`: the frequencies are fp32 values rounded to bf16 (the #1530-line records' cast model)."""
    if ntk != 1.0:
        base = base * ntk ** (dims / (dims - 2))
    half = dims // 2
    inv = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    if bf16:
        inv = inv.float().to(torch.bfloat16).double()
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv  # (T, half)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x[..., :half], x[..., half:dims]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., dims:]], -1)


def reference_attention_module(attn, cfg, n, doc_ids, ve):
    """docs/records/record-stack.md §2.4 steps 1-8 (and the #430 VE / head gate) in float64 from the module's
    weights."""
    B, T, _ = n.shape
    H, Hkv, D = attn.H, attn.Hkv, attn.D
    n = n.double()
    w = {name: p.detach().double() for name, p in attn.named_parameters()}
    q, k, v = n @ w["c_q.weight"].T, n @ w["c_k.weight"].T, n @ w["c_v.weight"].T
    q_raw = q
    if ve is not None:
        v = v + ve.double()
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    if cfg.qk_norm:
        q, k = _rms64(q), _rms64(k)
    dims = cfg.rope_dims or D
    rope = (dims, cfg.rope_base, cfg.rope_ntk_factor, cfg.bf16_rounding)
    q, k = _rope64(q, *rope), _rope64(k, *rope)
    q = q * w["q_gain"][None, None, :, None]
    y = reference_attention(q, k, v, doc_ids)
    if attn.xsa:  # y_h <- y_h - (y_h . vhat) vhat with the token's own value of the head's KV group
        vhat = F.normalize(v, dim=-1).repeat_interleave(H // Hkv, 2)
        y = y - (y * vhat).sum(-1, keepdim=True) * vhat
    if cfg.attn_gate == "attn_out":
        src = q_raw if cfg.attn_gate_input == "q" else n
        y = y * (2 * torch.sigmoid(src[..., :cfg.attn_gate_width] @ w["attn_gate_proj.weight"].T))[..., None]
    elif cfg.attn_gate == "dense":
        y = y * torch.sigmoid(n @ w["attn_gate_w"].T)[..., None]
    elif cfg.attn_gate == "sparse":
        y = y * torch.sigmoid(cfg.attn_gate_scale * n[..., :cfg.attn_gate_width] @ w["attn_gate_w"].T)[..., None]
    elif cfg.attn_gate == "head_scalar":
        y = y * w["attn_gate"][:, None]
    return y.reshape(B, T, H * D) @ w["proj.weight"].T


MODULES = [("baseline", []), ("pr1855", []), ("pr1855", ["model.attn_gate_scale=1.0"]), ("pr1784", []),
           ("pr1790", []), ("pr1790", ["model.attn_gate_input=q"]), ("pr430", []),
           ("baseline", ["model.rope_dims=4", "model.rope_ntk_factor=2.0", "model.xsa_last_n=9"])]


@pytest.mark.parametrize("preset,extra", MODULES, ids=[f"{p}{''.join(e)}" for p, e in MODULES])
def test_attention_module_equals_written_out_spec(preset, extra):
    """Attention(n) = the spec's QK-norm -> (partial, NTK) RoPE -> q_gain -> doc-masked SDPA -> XSA -> gate -> O."""
    model = tiny_model(preset, *extra)
    cfg = model.cfg
    layer = cfg.num_layers - 1
    attn = model.blocks[layer].attn
    assert attn.xsa == (cfg.xsa_last_n > 0)
    n = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(3))
    doc_ids = _packed_doc_ids(2, 30)
    kv = attn.Hkv * attn.D
    ve = torch.randn(2, 30, kv) if preset == "pr430" else None
    with torch.no_grad():
        out = attn(n, slot=layer, lora=None, doc_ids=doc_ids, ve=ve, backend="sdpa")
    ref = reference_attention_module(attn, cfg, n, doc_ids, ve)
    assert max_diff(out, ref) < 1e-4 * ref.abs().max().item()


def test_xsa_output_is_orthogonal_to_own_value_per_kv_group():
    """XSA (PR #478): each head's output has no component along its own token's value of the head's group."""
    model = tiny_model("pr1855", "model.attn_gate=none")
    attn = model.blocks[10].attn
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(64))  # module output = the heads' outputs, concatenated
        n = torch.randn(2, 20, 64)
        y = attn(n, slot=10, lora=None, doc_ids=None, ve=None, backend="sdpa").view(2, 20, 4, 16)
        v = attn.c_v(n).view(2, 20, 2, 16).repeat_interleave(2, 2)  # head h <- KV head h // 2
        scale = y.norm(dim=-1).max()
        assert (y * F.normalize(v, dim=-1)).sum(-1).abs().max() < 1e-5 * scale
        wrong = v.view(2, 20, 2, 2, 16).transpose(2, 3).reshape(2, 20, 4, 16)  # h <- h % 2: not orthogonal
        assert (y * F.normalize(wrong, dim=-1)).sum(-1).abs().max() > 1e-2 * scale


# ---------------------------------------------------------------- FlexAttention on CPU

@pytest.mark.slow
def test_flex_kernel_on_cpu_equals_float64_reference():
    """FlexAttention is the CUDA kernel where no FlashAttention is installed. PyTorch compiles its forward
    for the CPU too (no backward there), so its mask is held here without a device: causal inside each
    document, grouped-query heads, and plain causal without document ids (about 20 s of compiling); three
    blocks of 128, so the block mask has full, partial and empty blocks."""
    q, k, v = _qkv(2, 384, 4, 2, 16, seed=4)
    doc_ids = _packed_doc_ids(2, 384)
    doc_ids[0] = 1  # row 0 one document: blocks below the diagonal are full (no mask_mod inside them)
    mask = prepare_doc_mask(doc_ids, "flex")
    assert mask.plan.full_kv_num_blocks[0, 0].tolist() == [0, 1, 2]  # (document_block_mask)
    for ids in (doc_ids, None):
        y = attend(q, k, v, doc_ids=None if ids is None else prepare_doc_mask(ids, "flex"), backend="flex")
        assert y.shape == q.shape and max_diff(y, reference_attention(q, k, v, ids)) < 1e-5, ids is None


@pytest.mark.slow
def test_flex_model_on_cpu_equals_the_sdpa_model_with_packed_rows():
    """The whole pr1855 forward with `attention_backend = "flex"` gives the SDPA forward's logits and loss,
    with document masks on and packed rows cut every 32 tokens (`varlen`: the block mask is built at block
    level from the segment ids), so the mask the model prepares once per forward is the one each kernel needs."""
    idx, tgt = tokens(2, 128, seed=1, bos_at=(0, 40, 41, 100)), tokens(2, 128, seed=2)
    models = [tiny_model("pr1855", "model.doc_mask=true") for _ in range(2)]
    for m, backend in zip(models, ("flex", "sdpa")):
        m.attention_backend, m.max_doc_len = backend, 32
    with torch.no_grad():
        (flex_logits, flex_loss), (ref_logits, ref_loss) = ((m(idx), m(idx, tgt)) for m in models)
    assert max_diff(flex_logits, ref_logits) < 1e-4 and abs(flex_loss.item() - ref_loss.item()) < 1e-5


# ---------------------------------------------------------------- GPU backends

@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv", [(8, 4), (8, 8)])
@pytest.mark.parametrize("backend,dtype,tol", [("flex", torch.bfloat16, 2.5e-2), ("flex", torch.float32, 5e-3),
                                               ("fa3", torch.bfloat16, 2.5e-2), ("fa2", torch.bfloat16, 2.5e-2),
                                               ("sdpa", torch.bfloat16, 2.5e-2)],
                         ids=["flex-bf16", "flex-fp32", "fa3-bf16", "fa2-bf16", "sdpa-bf16"])
def test_cuda_backend_equals_float64_reference(backend, dtype, tol, H, Hkv):
    """FA3 / FA2 / flex / SDPA on CUDA, with and without document masks, match the float64 reference."""
    from pgolf.model.attention import kernel_available

    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    if not kernel_available(backend):
        pytest.skip(f"{backend} is not installed on this machine")
    assert resolve_backend(backend, "cuda") == backend
    B, T, D = 2, 256, 64
    q, k, v = _qkv(B, T, H, Hkv, D, seed=4, dtype=dtype, device="cuda")
    doc_ids = _packed_doc_ids(B, T, device="cuda")
    for ids in (doc_ids, None):
        y = attend(q, k, v, doc_ids=ids, backend=backend)
        assert y.is_cuda and y.shape == (B, T, H, D)
        assert max_diff(y, reference_attention(q, k, v, ids)) < tol, (backend, ids is None)


def test_a_flash_wheel_that_does_not_load_falls_back_to_the_next_kernel(tmp_path, monkeypatch):
    """A flash-attn wheel built for another torch / CUDA is found on the path but fails to import (an
    undefined symbol): it used to count as available, and the first forward failed. It now counts as
    missing, so `auto` on CUDA runs the next kernel."""
    from pgolf.model import attention

    (tmp_path / "pgolf_broken_fa.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(attention.FLASH_MODULES, "fa3", "pgolf_broken_fa")
    monkeypatch.setitem(attention.FLASH_MODULES, "fa2", "pgolf_no_such_module")
    attention._installed.cache_clear()
    try:
        assert importlib.util.find_spec("pgolf_broken_fa") is not None  # found, as before
        assert not attention.kernel_available("fa3") and not attention.kernel_available("fa2")
        assert attention.kernel_available("flex") and attention.resolve_backend("auto", "cuda") == "flex"
    finally:
        attention._installed.cache_clear()


def _dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, KV) bool of the kv blocks a BlockMask lists for each q block."""
    n = idx.size(-1)
    keep = torch.arange(n)[None, None, None, :] < num[..., None]
    return torch.zeros(*idx.shape[:-1], n, dtype=torch.bool).scatter_(-1, idx.long(), keep)


def test_document_block_mask_is_create_block_masks_from_the_ids_alone():
    """FlexAttention's document mask from segment ids at block level: (T / 128)^2 comparisons where
    create_block_mask evaluates every (q, kv) pair (10^10 per micro-step for a 98,304-token packed row).
    On random segmentations (documents crossing blocks, longer than a block, one token long, cut at
    max_doc_len, rows of any length) its partial and full blocks are create_block_mask's, block for block."""
    from torch.nn.attention.flex_attention import create_block_mask

    from pgolf.model.attention import document_block_mask

    g = torch.Generator().manual_seed(0)
    fulls = 0
    for trial in range(24):
        n = int(torch.randint(100, 800, (1,), generator=g))
        B, T = 2, (n // 128 + 1) * 128 if trial % 2 else n  # whole blocks, or a padded tail block
        idx = torch.randint(2, 100, (B, T), generator=g)
        idx.view(-1)[torch.randint(0, B * T, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g)] = BOS
        ids = segment_ids(idx, BOS, 64 * int(torch.randint(0, 4, (1,), generator=g)))

        def mask_mod(b, h, qi, ki, ids=ids):
            return (qi >= ki) & (ids[b, qi] == ids[b, ki])
        ref, got = create_block_mask(mask_mod, B, None, T, T, device="cpu"), document_block_mask(ids, mask_mod)
        for num, ind in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
            dense = [_dense(getattr(m, num), getattr(m, ind)) for m in (got, ref)]
            assert torch.equal(*dense), (trial, T, num)
        fulls += int(got.full_kv_num_blocks.sum())
    assert fulls > 0  # the trials reach full blocks, not only partial ones
