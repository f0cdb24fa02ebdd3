"""model.bf16_stream: under autocast the residual stream stays in the bf16 embedding table's dtype, as in the
#1530-line records, whose `GPT(h).bfloat16()` + `restore_fp32_params` leave tok_emb in bf16 and whose
forwards cast every control to x.dtype (docs/fidelity.md, procedure 20).

CPU autocast (bf16) stands in for CUDA's: its rms_norm keeps the input's dtype, as torch 2.9.1's CUDA
autocast did for the records. Tiny pr1855 models (d 64, V 256) with every switch of the preset.
"""
import pytest
import torch
import torch.nn.functional as F

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import BOS, tiny_model, tokens
from pgolf.model.lora import BatchedLoRA

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def model_with(stream: bool, looping: bool = True, preset: str = "pr1855"):
    model = tiny_model(preset, looping=looping)
    model.cfg.bf16_stream = stream  # a fresh copy of the config: tiny_model deep-copies the model
    return model


def idx_with_bos():
    return tokens(seed=3, bos_at=(0, 9, 20))


def record_hidden(model, idx, x):
    """#1855's `_forward_hidden` (train_gpt.py l.1324-1395) on the stream `x` = tok_emb(idx), written out:
    `Block.forward` (l.1126) and `GPT._parallel_block` (l.1291), every control cast to x.dtype there. The
    attention and MLP are pgolf's modules (issue 17 held them to the record's); the stream around them is
    the record's arithmetic, operation by operation. With `model.recur_carry=frozen` (pr1801), #1801's
    carry as its `_forward_hidden` adds it: x = beta_k * x, then x = x + alpha_kj * c_j for j = 0, 1, 2,
    each sum rounded in x's dtype (leonk2k2k's parameter-golf, records/.../UpdatedCarry/train_gpt.py)."""
    cfg, d = model.cfg, x.size(-1)
    mask = model.attention_mask(idx)
    blocks = model.physical_blocks()

    def attn(b, n):
        return b.attn(n, slot=0, lora=None, doc_ids=mask, ve=None, backend=model.attention_backend)

    def block(b, x, x0):
        mix = b.resid_mix.to(dtype=x.dtype)
        x_in = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
        x_out = x_in + b.attn_scale.to(dtype=x_in.dtype)[None, None, :] * attn(b, F.rms_norm(x_in, (d,)) * b.ln)
        return x_out + b.mlp_scale.to(dtype=x_out.dtype)[None, None, :] * b.mlp(F.rms_norm(x_out, (d,)) * b.ln)

    carry: dict[int, torch.Tensor] = {}

    def carried(i, x):
        if not (model.looping and cfg.recur_carry == "frozen" and cfg.loop_start <= i <= cfg.loop_end):
            return x
        if i not in carry:
            carry[i] = x
            return x
        k = i - cfg.loop_start
        x = model.carry_beta[k].to(dtype=x.dtype) * x
        for j in range(cfg.loop_end + 1 - cfg.loop_start):
            x = x + model.carry_alpha[k, j].to(dtype=x.dtype) * carry[cfg.loop_start + j]
        return x

    def parallel(i, lane0, lane1, x0):
        b = blocks[i]
        mix = b.resid_mix.to(dtype=lane0.dtype)
        a = attn(b, F.rms_norm(mix[0][None, None, :] * lane0 + mix[1][None, None, :] * x0, (d,)) * b.ln)
        a = b.attn_scale.to(dtype=lane0.dtype)[None, None, :] * a  # the record: attn_out.dtype, bf16 as lane0
        m = b.mlp_scale.to(dtype=lane1.dtype)[None, None, :] * b.mlp(F.rms_norm(lane1, (d,)) * b.ln)
        resid = model.parallel_resid_lambdas[i].to(dtype=lane0.dtype)
        post = model.parallel_post_lambdas[i].to(dtype=lane0.dtype)
        return (resid[0] * lane0 + post[0][0] * a + post[1][0] * m,
                resid[1] * lane1 + post[0][1] * a + post[1][1] * m)

    if cfg.smear_gate != "off":  # SmearGate with the BOS fix: g = lambda * sigmoid(W x_t[:w]), all in x's dtype
        g = model.smear_lambda.to(dtype=x.dtype) * torch.sigmoid(model.smear_gate(x[:, 1:, :cfg.smear_gate_width]))
        not_bos = (idx[:, 1:] != BOS).to(x.dtype).unsqueeze(-1)
        x = torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1] * not_bos], dim=1)
    x = x0 = F.rms_norm(x, (d,))
    L = cfg.num_layers
    if model.looping:
        loop = list(range(cfg.loop_start, cfg.loop_end + 1))
        order = list(range(cfg.loop_start)) + loop * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, L))
    else:
        order = list(range(L))
    enc, dec = order[: len(order) // 2], order[len(order) // 2:]
    skips = []
    for i in enc:
        x = carried(i, block(blocks[i], x, x0))
        skips.append(x)
    psl, lane0, lane1 = cfg.parallel_start_layer, None, None
    for j, i in enumerate(dec):
        lanes = i >= psl > 0
        if lanes and lane0 is None:
            lane0 = lane1 = x
        cur = lane0 if lanes else x
        if j < min(len(enc), len(dec)) and skips:
            w = model.skip_weights[j].to(dtype=cur.dtype)[None, None, :]
            gate = torch.sigmoid(model.skip_gates[j].to(dtype=cur.dtype))[None, None, :]
            cur = torch.lerp(w * skips.pop(), cur, gate)
        if lanes:
            lane0, lane1 = parallel(i, cur, lane1, x0)
        else:
            x = carried(i, block(blocks[i], cur, x0))
    if lane0 is not None:
        x = 0.5 * (lane0 + lane1)
    return F.rms_norm(x, (d,))


def stream_dtypes(model, idx, lora=None):
    """The dtype of x0, of every sequential block's output, of every attention and MLP input (the
    normalised stream, or lane, of every block) and of the final hidden state."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out.dtype)) for b in model.physical_blocks()]
    for b in model.physical_blocks():
        for mod in (b.attn, b.mlp):
            hooks.append(mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype)))
    x0 = model.embed(idx)
    h = model.hidden(idx, lora=lora)
    for hook in hooks:
        hook.remove()
    return x0.dtype, set(seen), h.dtype, len(seen)


def test_stream_is_bf16_under_autocast_with_the_switch_and_fp32_without():
    """Every block boundary in the table's bf16 with the switch (LoRA TTT's forward too), fp32 without it,
    and outside autocast (pgolf's CPU runs) the switch changes nothing."""
    idx = idx_with_bos()
    on, off = model_with(True), model_with(False)
    lora = BatchedLoRA(on, batch_size=idx.size(0), rank=2)
    with torch.no_grad():
        for B in lora.B.values():
            B.normal_()
    slots, lanes = len(on.layer_order()), on.cfg.num_layers - on.cfg.parallel_start_layer
    n_calls = 2 * slots + slots - lanes  # every attention and MLP, every sequential block's output
    with autocast():
        assert stream_dtypes(on, idx) == (BF16, {BF16}, BF16, n_calls)
        assert stream_dtypes(on, idx, lora) == (BF16, {BF16}, BF16, n_calls)
        assert stream_dtypes(off, idx) == (torch.float32, {torch.float32}, torch.float32, n_calls)
    assert on.tok_emb.weight.dtype == BF16
    assert torch.equal(on(idx), off(idx))


@pytest.mark.parametrize("preset", ["pr1855", "pr1801"])
@pytest.mark.parametrize("looping", [False, True])
def test_stream_equals_the_records_arithmetic_bit_for_bit(looping, preset):
    """With the switch, pgolf's forward under autocast is #1855's stream arithmetic exactly: the smear gate's
    lambda cast before the product, the skip gate's sigmoid of the cast gate, the lanes, the norms in bf16;
    and pr1801's frozen carry adds its terms one at a time in #1801's order (adding their sum first, as
    pgolf did, moved the bf16 stream by up to 0.25)."""
    idx = idx_with_bos()
    model = model_with(True, looping, preset)
    with torch.no_grad(), autocast():
        h = model.hidden(idx)
        ref = record_hidden(model, idx, model.tok_emb(idx))
    assert h.dtype == ref.dtype == BF16
    assert torch.equal(h, ref)


@pytest.mark.parametrize("looping", [False, True])
def test_switch_off_keeps_the_fp32_stream(looping):
    """Off, the forward is the one before the switch: the bf16 table read into an fp32 stream (`.float()`),
    where every cast of a control is a no-op, so the same arithmetic from the fp32 embedding is exact."""
    idx = idx_with_bos()
    model = model_with(False, looping)
    with torch.no_grad(), autocast():
        h = model.hidden(idx)
        ref = record_hidden(model, idx, model.tok_emb(idx).float())
    assert h.dtype == ref.dtype == torch.float32
    assert torch.equal(h, ref)


def test_norms_keep_the_stream_dtype_where_autocast_would_return_fp32(monkeypatch):
    """torch >= 2.12 puts rms_norm on CUDA autocast's fp32 list; the records' 2.9.1 returned the input's
    dtype. With the switch pgolf's norms return the input's dtype whatever the policy: here an fp32-returning
    rms_norm (that policy, emulated on the CPU) leaves the bf16 stream and its values as they were."""
    idx = idx_with_bos()
    model = model_with(True)
    with torch.no_grad(), autocast():
        before = model.hidden(idx)
        rms_norm = F.rms_norm
        monkeypatch.setattr(F, "rms_norm", lambda x, shape, *a, **kw: rms_norm(x.float(), shape, *a, **kw))
        dtypes = stream_dtypes(model, idx)[:3]
        after = model.hidden(idx)
    assert dtypes == (BF16, {BF16}, BF16)
    assert torch.equal(after, before)


def test_the_record_line_presets_set_the_switch():
    from pgolf.presets import get_preset

    for name in ("pr1765", "pr1784", "pr1790", "pr1801", "pr1855"):
        assert get_preset(name).model.bf16_stream, name
    for name in ("baseline", "cpu-smoke", "pr430"):
        assert not get_preset(name).model.bf16_stream, name


@pytest.mark.gpu
def test_stream_is_bf16_under_cuda_autocast_and_compiled_agrees_with_eager():
    """On CUDA (whose autocast puts rms_norm on its fp32 list from torch 2.12) the stream stays bf16 with the
    switch, and Inductor's forward agrees with the eager one to bf16 precision."""
    idx = idx_with_bos().cuda()
    model = model_with(True).cuda()
    with torch.autocast("cuda", dtype=BF16):
        assert stream_dtypes(model, idx)[:3] == (BF16, {BF16}, BF16)
        with torch.no_grad():
            eager = model.hidden(idx).float()
            compiled = torch.compile(model.hidden, fullgraph=True)(idx).float()
    assert (compiled - eager).abs().max().item() <= 0.05 * eager.abs().max().item()
