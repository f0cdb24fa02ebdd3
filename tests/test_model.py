"""pgolf.model.GPT: the forward API, initialisation against the specs, transparent gates, and the
#1855 structure (virtual layer order, U-Net skip pairs, parallel lanes) against docs/records/record-stack.md §2.

Tiny models only (d 64, V 256); see model_helpers.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import BOS, copy_weights, max_diff, tiny_cfg, tiny_model, tokens
from pgolf.errors import PgolfError
from pgolf.model import build_model

LOOPED_ORDER = [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]  # docs/records/record-stack.md §2.6
LOOPED_PAIRS = [(5, 4), (3, 3), (4, 5), (5, 4), (6, 3), (7, 2), (8, 1), (9, 0)]  # §2.7
PLAIN_PAIRS = [(5, 4), (6, 3), (7, 2), (8, 1), (9, 0)]


def rms(x):
    return F.rms_norm(x, (x.size(-1),))


# ---------------------------------------------------------------- forward API

def test_forward_returns_capped_logits_mean_and_per_token_loss():
    """logits are fp32 and soft-capped; mean CE = mean of per-token CE = CE of the returned logits."""
    model = tiny_model("baseline", "model.logit_softcap=2.0")
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)  # raw logits well beyond the cap
    idx, tgt = tokens(seed=1), tokens(seed=2)
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape == (2, 32, 256)
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9  # tanh saturates at the cap
    per_tok = model(idx, tgt, reduction="none")
    assert per_tok.shape == (2, 32)
    ref = F.cross_entropy(logits.view(-1, 256), tgt.view(-1), reduction="none").view(2, 32)
    torch.testing.assert_close(per_tok, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(idx, tgt), per_tok.mean(), rtol=0, atol=1e-6)


def test_logits_are_the_tied_head_of_hidden():
    """forward = softcap(hidden @ tok_emb^T): the head reads GPT.hidden through GPT.logits."""
    model = tiny_model("pr1855")
    idx = tokens(bos_at=(0, 9))
    h = model.hidden(idx)
    assert torch.equal(model.logits(h), h @ model.tok_emb.weight.float().T)  # a bf16-stored table, fp32 head
    cap = model.cfg.logit_softcap
    torch.testing.assert_close(model(idx), cap * torch.tanh(model.logits(h) / cap), rtol=0, atol=0)


# ---------------------------------------------------------------- initialisation against the specs

def _orthonormal(w):
    small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(small, torch.eye(small.shape[0]), atol=1e-5)


def test_record_init_matches_spec():
    """docs/records/record-stack.md §2.11 + gate tables: orthogonal Q/K/V/up, zero O/down, N(0, .005) tok_emb,
    gate inits."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg("pr1855", "model.bf16_rounding=false"))  # before the records' bf16 cast (test_procedure)
    for b in m.blocks:
        assert all(_orthonormal(lin.weight) for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc))
        assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()
        assert torch.equal(b.attn.q_gain, torch.full((4,), 5.0))
        assert not b.attn.attn_gate_w.any() and b.attn.attn_gate_w.shape == (4, 12)  # sparse: zero
        assert torch.equal(b.resid_mix, torch.stack([torch.ones(64), torch.zeros(64)]))
        assert torch.equal(b.attn_scale, torch.ones(64)) and torch.equal(b.mlp_scale, torch.ones(64))
    assert abs(m.tok_emb.weight.std().item() - 0.005) < 0.0005
    assert not m.smear_gate.weight.any() and m.smear_lambda.item() == 0.0
    assert torch.equal(m.skip_weights, torch.ones(8, 64)) and not m.skip_gates.any()
    assert torch.equal(m.parallel_post_lambdas, torch.ones(11, 2, 2))
    assert torch.equal(m.parallel_resid_lambdas, torch.full((11, 2), 1.1))


def test_hedge_line_init_matches_spec():
    """docs/records/hedge-stack.md §1.1, §2, §4: bigram table/proj zero, scale .05; VE proj zero; gate 1; lambda_v 0."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg("pr430"))
    assert not m.bigram.embed.weight.any() and not m.bigram.proj.weight.any()
    assert m.bigram.bigram_scale.item() == pytest.approx(0.05)
    assert not m.ve.proj.weight.any() and m.ve.ve_scale.item() == pytest.approx(0.1)
    assert torch.equal(m.ve.ve_layer_scales, torch.ones(2))
    assert abs(m.ve.embed.weight.std().item() - 0.01) < 0.002
    assert not m.smear_gate.any()  # per-channel smear: sigma(0) = 0.5
    for b in m.blocks:
        assert torch.equal(b.attn.attn_gate, torch.ones(4)) and b.lambda_v.item() == 0.0


def test_dense_gate_init_std_and_attn_out_gate_zero():
    """#1784 dense gate W_g ~ N(0, 0.005); #1790 AttnOutGate (24 wide) is zero-initialised."""
    torch.manual_seed(0)
    dense = build_model(tiny_cfg("pr1784"))
    w = torch.cat([b.attn.attn_gate_w.flatten() for b in dense.blocks])
    assert w.numel() == 11 * 4 * 64 and abs(w.std().item() - 0.005) < 0.0004
    ao = build_model(tiny_cfg("pr1790"))
    for b in ao.blocks:
        assert b.attn.attn_gate_proj.weight.shape == (4, 24) and not b.attn.attn_gate_proj.weight.any()


def test_baseline_init_is_nn_linear_default_with_zero_projections():
    """docs/records/record-stack.md Appendix B: Q/K/V/up keep nn.Linear's default U(±1/sqrt(in)); O and MLP-down
    start at zero."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg("baseline"))
    b = m.blocks[0]
    bound = 1 / math.sqrt(64)
    assert b.attn.c_q.weight.abs().max() <= bound and b.attn.c_q.weight.abs().max() > 0.9 * bound
    assert not _orthonormal(b.attn.c_q.weight)
    assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()


# ---------------------------------------------------------------- embedding path

@pytest.mark.parametrize("bos_mask", [False, True])
def test_bigram_hash_buckets_match_spec(bos_mask):
    """docs/records/hedge-stack.md §2: bucket_t = (36313 id_t XOR 27191 id_{t-1}) mod (B-1); B-1 at t = 0 (and
    at a BOS if masked)."""
    model = tiny_model("pr430", f"model.smear_bos_mask={str(bos_mask).lower()}")
    idx = tokens(T=20, bos_at=(7,))
    seen = []
    model.bigram.embed.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.embed(idx)
    cur, prev = idx[:, 1:], idx[:, :-1]
    expect = torch.cat([torch.full((2, 1), 63), ((36313 * cur) ^ (27191 * prev)) % 63], 1)
    if bos_mask:
        expect[:, 7] = 63
    assert torch.equal(seen[0], expect)


def test_hedge_embedding_path_matches_spec():
    """docs/records/hedge-stack.md §1.1: x0 = (1 - s) x_t + s x_{t-1}, x_{-1} = 0, x = RMSNorm(tok_emb +
    BigramHash), s = sigmoid(g)."""
    model = tiny_model("pr430")
    idx = tokens(T=20, bos_at=(7,))
    with torch.no_grad():
        first = torch.zeros_like(idx, dtype=torch.bool)
        first[:, 0] = True
        x = rms(model.tok_emb(idx) + model.bigram(idx, first))
        s = torch.sigmoid(model.smear_gate)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        torch.testing.assert_close(model.embed(idx), (1 - s) * x + s * prev, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- MLP and block

@pytest.mark.parametrize("preset,slope", [("baseline", 0.0), ("pr1855", 0.5), ("pr1855:0.25", 0.25)])
def test_mlp_is_squared_leaky_relu(preset, slope):
    """MLP(x) = W_down phi(W_up x): phi = ReLU(u)^2 (baseline) or LeakyReLU(u, slope)^2 (PR #549)."""
    name, *s = preset.split(":")
    model = tiny_model(name, *[f"model.leaky_slope={v}" for v in s])
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 64)
    u = x @ mlp.fc.weight.T
    phi = torch.where(u > 0, u, slope * u).square()
    torch.testing.assert_close(mlp(x), phi @ mlp.proj.weight.T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- transparent gates at init

TRANSPARENT = [  # (preset, overrides, the gate's parameter names, what makes it transparent)
    ("pr1790", [], "attn_gate_proj", "AttnOutGate 2*sigmoid(0) = 1"),
    ("pr1790", ["model.attn_gate_input=q"], "attn_gate_proj", "AttnOutGate on raw q, 2*sigmoid(0) = 1"),
    ("pr430", [], "attn.attn_gate", "head_scalar gate = 1"),
    ("pr430", [], "lambda_v", "value residual lambda_v = 0"),
    ("pr1855", [], "smear_lambda", "SmearGate lambda = 0 (gate weights random)"),
]
_OFF = {"attn_gate_proj": "model.attn_gate=none", "attn.attn_gate": "model.attn_gate=none",
        "lambda_v": "model.value_residual=false", "smear_lambda": "model.smear_gate=off"}


@pytest.mark.parametrize("preset,extra,gate,why", TRANSPARENT, ids=[t[3] for t in TRANSPARENT])
def test_transparent_gate_at_init_is_exactly_the_model_without_it(preset, extra, gate, why):
    """A gate at its init value leaves the output bit-identical to the model built without the gate."""
    gated = tiny_model(preset, *extra, keep=(gate,))
    plain = tiny_model(preset, *extra, _OFF[gate], randomize=False)
    extra_keys = copy_weights(gated, plain)
    assert extra_keys and all(gate in k or "smear_gate" in k for k in extra_keys)
    idx = tokens(bos_at=(0, 11))
    assert torch.equal(gated.hidden(idx), plain.hidden(idx)), why


@pytest.mark.parametrize("preset,extra", [("pr1855", []), ("pr1801", []),
                                          ("pr1784", ["model.attn_gate_init_std=0.0"])],
                         ids=["sparse-scale-0.5", "sparse-scale-1", "dense-std-0"])
def test_sigmoid_zero_gates_halve_attention_exactly(preset, extra):
    """sigma(0) = 0.5 gates: attention output = 0.5x the ungated one; 2x attn_scale restores the model."""
    gated = tiny_model(preset, *extra, keep=("attn_gate_w",))
    plain = tiny_model(preset, *extra, "model.attn_gate=none", randomize=False)
    assert copy_weights(gated, plain) == sorted(f"blocks.{i}.attn.attn_gate_w" for i in range(11))
    n = torch.randn(2, 32, 64)
    for i in (0, 10):
        kw = dict(slot=i, lora=None, doc_ids=None, ve=None, backend="sdpa")
        assert torch.equal(gated.blocks[i].attn(n, **kw), 0.5 * plain.blocks[i].attn(n, **kw))
    with torch.no_grad():
        for b in gated.blocks:
            b.attn_scale.mul_(2)
    idx = tokens(bos_at=(0, 11))
    assert torch.equal(gated.hidden(idx), plain.hidden(idx))


# ---------------------------------------------------------------- structure of #1855

def _visited(model, idx):
    """Physical indices of the attention modules in the order the forward runs them."""
    seen, hooks = [], []
    for i, b in enumerate(model.blocks):
        hooks.append(b.attn.register_forward_hook(lambda mod, args, out, i=i: seen.append(i)))
    model(idx)
    for h in hooks:
        h.remove()
    return seen


def test_pr1855_virtual_order_and_skip_pairs_looped_and_not():
    """Looping on: the 17-slot order with dec 5<-4, 3<-3, 4<-5, 5<-4, 6<-3 ... 9<-0; off: 11 layers, 5<-4 ... 9<-0."""
    model = tiny_model("pr1855", looping=False)
    assert model.layer_order() == list(range(11)) and model.skip_pairs() == PLAIN_PAIRS
    idx = tokens()
    assert _visited(model, idx) == list(range(11))
    model.looping = True
    assert model.layer_order() == LOOPED_ORDER and model.skip_pairs() == LOOPED_PAIRS
    assert 10 not in [d for d, _ in model.skip_pairs()]
    assert _visited(model, idx) == LOOPED_ORDER
    assert model.num_slots == 17


FROZEN_BETA = [1.56, 1.85, 2.13]  # docs/records/record-stack.md §2.6 (#1801)
FROZEN_ALPHA = [[0.23, 0.04, 0.03], [0.13, -0.34, 0.01], [0.06, 0.19, -0.02]]


def reference_hidden(model, idx, looping):
    """docs/records/record-stack.md §2.2-2.8 written out for the #1855 / #1801 models, reusing only attention
    and MLP."""
    cfg = model.cfg
    order = LOOPED_ORDER if looping else list(range(11))
    n_enc = len(order) // 2
    enc, dec = order[:n_enc], order[n_enc:]
    doc_ids = (idx == BOS).cumsum(1, dtype=torch.int32)
    e = model.tok_emb(idx).float()  # the table may be stored in bf16 (tok_emb_bf16)
    if cfg.smear_gate == "gated":  # §2.2 SmearGate with the BOS mask
        g = model.smear_lambda * torch.sigmoid(e[:, 1:, :12] @ model.smear_gate.weight[0])  # (B, T-1)
        g = g * (idx[:, 1:] != BOS)
        e = torch.cat([e[:, :1], e[:, 1:] + g[..., None] * e[:, :-1]], 1)
    x0 = rms(e)

    def A(slot, i, x_in):  # §2.3/2.4 with s_l = 1/sqrt(l+1), l physical
        b = model.blocks[i]
        y = b.attn(rms(x_in) / math.sqrt(i + 1), slot=slot, lora=None, doc_ids=doc_ids, ve=None, backend="sdpa")
        return b.attn_scale * y

    def M(i, x):
        b = model.blocks[i]
        return b.mlp_scale * b.mlp(rms(x) / math.sqrt(i + 1))

    def mix(i, x):
        return model.blocks[i].resid_mix[0] * x + model.blocks[i].resid_mix[1] * x0

    carry = {}

    def block(slot, i, x):
        x_in = mix(i, x)
        x = x_in + A(slot, i, x_in)
        x = x + M(i, x)
        if looping and cfg.recur_carry == "frozen" and i in (3, 4, 5):  # §2.6 frozen alpha/beta carry
            if i not in carry:
                carry[i] = x.detach()
            else:
                k = i - 3
                x = FROZEN_BETA[k] * x + sum(FROZEN_ALPHA[k][j] * carry[3 + j] for j in range(3))
        return x

    stack, x = [], x0
    for slot, i in enumerate(enc):
        x = block(slot, i, x)
        stack.append(x)
    lane0 = lane1 = None
    n_skip = min(len(enc), len(dec))
    for j, i in enumerate(dec):
        slot = n_enc + j
        if i >= 8 and lane0 is None:  # §2.8: lanes from physical layer 8 on, both start at x
            lane0 = lane1 = x
        if j < n_skip:  # §2.7: x <- s*x + (1-s)*(w*skip), into lane0 once the lanes exist
            s, skip = torch.sigmoid(model.skip_gates[j]), model.skip_weights[j] * stack.pop()
            if lane0 is None:
                x = s * x + (1 - s) * skip
            else:
                lane0 = s * lane0 + (1 - s) * skip
        if i >= 8:
            a, m = A(slot, i, mix(i, lane0)), M(i, lane1)
            r, p = model.parallel_resid_lambdas[i], model.parallel_post_lambdas[i]
            lane0, lane1 = r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m
        else:
            x = block(slot, i, x)
    return rms(0.5 * (lane0 + lane1))


@pytest.mark.parametrize("preset", ["pr1855", "pr1801"])
@pytest.mark.parametrize("looping", [False, True])
def test_record_forward_equals_written_out_spec(preset, looping):
    """The whole forward (smear, U-Net skips with gates, loops, frozen carry, lanes, mean) equals §2 written out."""
    model = tiny_model(preset, looping=looping)
    idx = tokens(T=40, bos_at=(0, 13, 30))
    with torch.no_grad():
        ref = reference_hidden(model, idx, looping)
        assert max_diff(model.hidden(idx), ref) < 1e-5


def test_parallel_lanes_only_on_decoder_layers_from_start_and_final_is_their_mean():
    """Lanes run exactly on decoder slots with physical index >= 8; hidden = RMSNorm(mean of the last lanes)."""
    model = tiny_model("pr1855")
    ran, last = [], {}
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda mod, a, o, i=i: ran.append(("seq", i)))
        orig = b.forward_parallel

        def par(*a, i=i, orig=orig, **kw):
            ran.append(("par", i))
            last["lanes"] = orig(*a, **kw)
            return last["lanes"]
        b.forward_parallel = par
    idx = tokens(bos_at=(0, 17))
    h = model.hidden(idx)
    order = LOOPED_ORDER
    expect = [("par" if slot >= 8 and i >= 8 else "seq", i) for slot, i in enumerate(order)]
    assert ran == expect and ("par", 8) in ran
    l0, l1 = last["lanes"]
    assert max_diff(l0, l1) > 1e-2  # two genuinely different lanes
    assert torch.equal(h, rms(0.5 * (l0 + l1)))


def test_sequential_layer_after_lanes_is_rejected():
    """A virtual order where a sequential layer would follow the two lanes (lanes silently dropped) is an error."""
    with pytest.raises(PgolfError, match="parallel_start_layer"):
        build_model(tiny_cfg("pr1855", "model.parallel_start_layer=4"))
    build_model(tiny_cfg("pr1855", "model.parallel_start_layer=3"))  # every decoder slot parallel: fine


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "flex", "fa3", "fa2", "sdpa"])
@pytest.mark.parametrize("preset", ["baseline", "pr430", "pr1855"])
def test_bf16_autocast_forward_matches_fp32_on_cuda(preset, backend):
    """On CUDA, each backend under bf16 autocast (doc masks on) tracks the fp32 SDPA forward's loss and logits."""
    from pgolf.model.attention import resolve_backend

    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    if resolve_backend(backend, "cuda") != backend and backend != "auto":
        pytest.skip(f"{backend} is not available on this machine")
    backend = resolve_backend(backend, "cuda")
    model = tiny_model(preset, "model.doc_mask=true").cuda()
    model.attention_backend = backend
    idx, tgt = tokens(4, 256, seed=1, bos_at=(0, 70, 200)).cuda(), tokens(4, 256, seed=2).cuda()
    ref_model = tiny_model(preset, "model.doc_mask=true").cuda()  # fp32 SDPA reference
    with torch.no_grad():
        ref_logits, ref_loss = ref_model(idx), ref_model(idx, tgt)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx), model(idx, tgt)
    assert logits.dtype == torch.float32
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert rel < 3e-2, (backend, rel)
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item(), backend


@pytest.mark.gpu
def test_fused_softcap_ce_equals_eager_on_cuda():
    """The compiled (fused) soft-capped CE used in CUDA training gives the eager reference's value."""
    from pgolf.model.loss import fused_softcap_cross_entropy, softcap_cross_entropy

    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = 40 * torch.randn(4, 128, 1024, device="cuda", generator=g)
    tgt = torch.randint(0, 1024, (4, 128), device="cuda", generator=g)
    for reduction in ("mean", "none"):
        ref = softcap_cross_entropy(logits, tgt, 30.0, reduction)
        torch.testing.assert_close(fused_softcap_cross_entropy(logits, tgt, 30.0, reduction), ref, rtol=1e-5, atol=1e-5)



def test_forward_at_equals_the_full_forward_at_those_positions():
    """Scoring only some positions (TTT chunks, sliding strides) gives the full forward's logits there."""
    from pgolf.model import BatchedLoRA, build_model
    from pgolf.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("pr1855", ["model.num_layers=6", "model.loop_start=1", "model.loop_end=2",
                                "model.parallel_start_layer=4", "model.model_dim=64", "model.num_heads=2",
                                "model.num_kv_heads=1", "model.vocab_size=128"])
    model = build_model(cfg)
    model.looping = True
    lora = BatchedLoRA(model, 2, 4, 8.0)
    for B in lora.B.values():
        torch.nn.init.normal_(B, std=0.1)
    idx = torch.randint(2, 128, (2, 40))
    idx[:, 0] = 1
    pos = torch.tensor([[3, 17, 39], [0, 5, 6]])
    full = model(idx, lora=lora)
    at = model.forward_at(idx, pos, lora=lora)
    assert at.shape == (2, 3, 128)
    assert torch.allclose(at, full.gather(1, pos[..., None].expand(-1, -1, 128)), atol=1e-6, rtol=0)
