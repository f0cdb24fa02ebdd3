"""pgolf.optim: Newton-Schulz against the SVD polar factor, the Muon update rule, the parameter
split, the LR / momentum schedules and the EMA. Small matrices only (2 shared CPU cores)."""
import copy

import pytest
import torch
from torch import nn

from pgolf.config import OptimConfig
from pgolf.optim import (EMA, POLAR_EXPRESS, Muon, build_optimizers, classify_params, clip_grad_norm,
                         lr_multiplier, momentum_at, ns_coefficients, zeropower)
from pgolf.presets import baseline, pr1855


def polar(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def rel_err(X, P):
    return ((X.double() - P).norm() / P.norm()).item()


# ---------------------------------------------------------------- Newton-Schulz

@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (3, 16, 32)])
def test_classic_ns_is_near_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = zeropower(G, 5, "classic", dtype=torch.bfloat16)  # the records' numerics
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    P = polar(G)
    cos = (X.double() * P).sum((-2, -1)) / (X.double().norm(dim=(-2, -1)) * P.norm(dim=(-2, -1)))
    assert cos.min() > 0.97
    s = torch.linalg.svdvals(X.double())
    # the classic quintic leaves singular values in roughly [0.7, 1.2], not at 1
    assert s.min() > 0.6 and s.max() < 1.2


def test_polar_express_is_closer_than_classic():
    torch.manual_seed(1)
    G = torch.randn(32, 96)
    P = polar(G)
    bf16 = torch.bfloat16
    e_classic = rel_err(zeropower(G, 5, "classic", dtype=bf16), P)
    e_pe = rel_err(zeropower(G, 5, "polar_express", dtype=bf16), P)
    s = torch.linalg.svdvals(zeropower(G, 5, "polar_express", dtype=bf16).double())
    assert s.min() > 0.8 and s.max() < 1.2
    assert e_pe < 0.13 and e_pe < 0.7 * e_classic


def _reference_ns(G, tuples):
    """Hand-rolled float64 iteration with an explicit list of (a, b, c)."""
    X = G.double()
    tall = X.shape[-2] > X.shape[-1]
    X = X.mT if tall else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in tuples:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def test_polar_express_uses_the_five_tuples_in_order():
    assert ns_coefficients(5, "polar_express") == list(POLAR_EXPRESS)
    assert ns_coefficients(3, "polar_express") == list(POLAR_EXPRESS[:3])
    assert POLAR_EXPRESS[0][0] == pytest.approx(8.156554524902461)
    assert POLAR_EXPRESS[4][2] == pytest.approx(0.42323551169305323)
    torch.manual_seed(2)
    G = torch.randn(12, 20, dtype=torch.float64)
    X = zeropower(G, 5, "polar_express", dtype=torch.float64)
    torch.testing.assert_close(X, _reference_ns(G, POLAR_EXPRESS), rtol=0, atol=1e-10)
    assert (X - _reference_ns(G, POLAR_EXPRESS[::-1])).abs().max() > 1e-3  # order matters
    # more than five steps still runs each tuple exactly once; fewer uses the first ones
    torch.testing.assert_close(zeropower(G, 7, "polar_express", dtype=torch.float64), X, rtol=0, atol=0)
    torch.testing.assert_close(zeropower(G.mT, 3, "polar_express", dtype=torch.float64),
                               _reference_ns(G.mT, POLAR_EXPRESS[:3]), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        zeropower(G, 5, "nope")


def test_classic_matches_reference():
    torch.manual_seed(3)
    G = torch.randn(2, 10, 6, dtype=torch.float64)  # batched and tall
    torch.testing.assert_close(zeropower(G, 4, "classic", dtype=torch.float64),
                               _reference_ns(G, [(3.4445, -4.7750, 2.0315)] * 4), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- Muon update rule

def _muon_step(p0, grads, **kw):
    p = nn.Parameter(p0.clone())
    opt = Muon([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_muon_nesterov_momentum_and_update():
    torch.manual_seed(4)
    p0, g1, g2 = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10)
    lr, mu = 0.1, 0.9
    got = _muon_step(p0, [g1, g2], lr=lr, momentum=mu)
    buf = mu * g1 + g2  # buf1 = g1; buf2 = mu*buf1 + g2
    want = p0 - lr * zeropower(g1 + mu * g1).float() - lr * zeropower(g2 + mu * buf).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_muon_row_normalize_before_orthogonalising():
    torch.manual_seed(5)
    p0, g = torch.randn(8, 16), torch.randn(8, 16)
    g_big = g.clone()
    g_big[0] *= 1000.0
    kw = dict(lr=1.0, momentum=0.9, coeffs="polar_express")
    on = [_muon_step(p0, [x], row_normalize=True, **kw) - p0 for x in (g, g_big)]
    off = [_muon_step(p0, [x], row_normalize=False, **kw) - p0 for x in (g, g_big)]
    assert (on[0] - on[1]).abs().max() < 0.02  # bf16 noise only
    assert (off[0] - off[1]).abs().max() > 0.2
    # MuonEq-R is exactly "normalise rows of u, then Newton-Schulz"
    u = (1 + 0.9) * g
    want = -zeropower(u / u.norm(dim=-1, keepdim=True), 5, "polar_express").float()
    torch.testing.assert_close(on[0], want, rtol=0, atol=1e-5)


def test_muon_decoupled_weight_decay():
    p0 = torch.randn(4, 4)
    got = _muon_step(p0, [torch.zeros(4, 4)], lr=0.5, weight_decay=0.1)  # zero grad: decay only
    torch.testing.assert_close(got, p0 * (1 - 0.5 * 0.1))


def test_ns_dtype_is_fp32_on_cpu():
    assert zeropower(torch.randn(4, 6)).dtype == torch.float32  # bf16 matmul is ~20x slower here


@pytest.mark.parametrize("shape,scale,dtype", [((8, 2), 2.0, None), ((2, 8), 1.0, None),
                                               ((4, 4), 1.0, None), ((8, 2), 2.0, torch.bfloat16)])
def test_muon_shape_factor(shape, scale, dtype):
    torch.manual_seed(6)
    p0, g = torch.randn(*shape), torch.randn(*shape)
    got = _muon_step(p0, [g], lr=0.01, momentum=0.0, ns_dtype=dtype)
    want = p0 - 0.01 * scale * zeropower(g, dtype=dtype).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_muon_batches_same_shapes_like_one_at_a_time():
    torch.manual_seed(7)
    shapes = [(8, 4), (4, 8), (8, 4), (8, 4)]
    ps0 = [torch.randn(*s) for s in shapes]
    gs = [torch.randn(*s) for s in shapes]
    ps = [nn.Parameter(p.clone()) for p in ps0]
    opt = Muon(ps, lr=0.05, momentum=0.5, row_normalize=True)
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()
    for p, p0, g in zip(ps, ps0, gs):
        torch.testing.assert_close(p.detach(), _muon_step(p0, [g], lr=0.05, momentum=0.5, row_normalize=True),
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------- momentum and LR schedules

def test_momentum_warmup_0p92_to_0p97_over_1500():
    cfg = pr1855().optim
    assert momentum_at(0, cfg) == pytest.approx(0.92)
    assert momentum_at(750, cfg) == pytest.approx(0.945)
    assert momentum_at(1500, cfg) == pytest.approx(0.97)
    assert momentum_at(5000, cfg) == pytest.approx(0.97)
    assert momentum_at(250, baseline().optim) == pytest.approx(0.90)  # 0.85 -> 0.95 over 500
    assert momentum_at(3, OptimConfig(muon_momentum_warmup_steps=0)) == pytest.approx(0.95)


def test_lr_schedule_warmdown_frac_with_floor():
    t = pr1855().train  # WARMDOWN_FRAC 0.85, MIN_LR 0.1
    B = 599.5

    def m(frac):
        return lr_multiplier(0, frac * B, t, B, 100.0)

    assert m(0.0) == 1.0 and m(0.149) == 1.0
    assert m(0.15) == pytest.approx(1.0)
    assert m(0.5) == pytest.approx(0.5 / 0.85)
    assert m(0.915) == pytest.approx(0.1)
    assert m(0.9) > 0.1 + 1e-6
    assert m(0.95) == pytest.approx(0.1) and m(1.2) == pytest.approx(0.1)
    t.min_lr = 0.0
    assert m(1.0) == 0.0 and m(1.2) == 0.0


def test_lr_schedule_iterations_wallclock_estimate():
    t = baseline().train  # WARMDOWN_ITERS 1200, no floor
    # 50 ms/step -> the last 60 s of a 600 s budget
    assert lr_multiplier(9000, 500.0, t, 600.0, 50.0) == 1.0
    assert lr_multiplier(11000, 570.0, t, 600.0, 50.0) == pytest.approx(0.5)
    assert lr_multiplier(12000, 600.0, t, 600.0, 50.0) == 0.0
    assert lr_multiplier(0, 0.0, t, 600.0, 0.0) == 1.0  # no step time measured yet
    # no time budget: by iteration count
    assert lr_multiplier(18_000, 0.0, t, 0.0, 0.0) == 1.0
    assert lr_multiplier(18_800, 0.0, t, 0.0, 0.0) == pytest.approx(1.0)
    assert lr_multiplier(19_400, 0.0, t, 0.0, 0.0) == pytest.approx(0.5)
    t.min_lr = 0.2
    assert lr_multiplier(19_900, 0.0, t, 0.0, 0.0) == pytest.approx(0.2)
    t.warmdown_iters = 0
    assert lr_multiplier(19_900, 599.0, t, 600.0, 50.0) == 1.0


# ---------------------------------------------------------------- parameter split

class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_q, self.proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d // 2, bias=False)
        self.q_gain = nn.Parameter(torch.ones(4))
        self.attn_gate_w = nn.Parameter(torch.zeros(4, 6))  # SparseAttnGate (8, 12) analog: 2-D control
        self.attn_gate_proj = nn.Linear(6, 4, bias=False)  # AttnOutGate: a Linear, still control


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = _Attn(d)
        self.mlp = nn.Sequential()
        self.mlp.fc, self.mlp.proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.ones(2, d))
        self.norm = nn.LayerNorm(d)


class _Bigram(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.proj = nn.Linear(8, d, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))


class _Tiny(nn.Module):
    def __init__(self, d=16, vocab=32, tied=True):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.bigram = _Bigram(d)
        self.smear_gate = nn.Linear(12, 1, bias=False)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(2)])
        self.skip_weights = nn.Parameter(torch.ones(1, d))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(2, 2, 2))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rot", torch.zeros(3))

    def forward(self, idx):
        x = self.tok_emb(idx) + self.bigram.proj(self.bigram.embed(idx))
        for b in self.blocks:
            x = x + b.attn.proj(b.attn.c_q(x)) * b.attn_scale
            x = x + b.mlp.proj(torch.relu(b.mlp.fc(x)))
        return self.lm_head(x)


def _names(groups):
    return {g: sorted(n for n, _ in ps) for g, ps in groups.items()}


def test_classify_params():
    model = _Tiny(tied=False)
    groups = _names(classify_params(model))
    muon = groups["muon"]
    assert "blocks.0.attn.c_q.weight" in muon and "blocks.1.mlp.fc.weight" in muon
    assert "bigram.proj.weight" in muon  # #688 family: bigram / VE projections are Muon matrices
    assert not any("gate" in n or "lambdas" in n or "skip" in n or "resid_mix" in n for n in muon)
    assert groups["embed"] == ["bigram.embed.weight", "tok_emb.weight"]
    assert groups["head"] == ["lm_head.weight"]
    scal = groups["scalar"]
    for n in ["blocks.0.attn.attn_gate_w", "blocks.0.attn.attn_gate_proj.weight", "smear_gate.weight",
              "blocks.0.resid_mix", "skip_weights", "parallel_post_lambdas", "blocks.0.attn.q_gain",
              "blocks.1.norm.weight", "blocks.1.norm.bias", "bigram.scale"]:
        assert n in scal, n
    every = sum(len(v) for v in groups.values())
    assert every == len(list(model.parameters()))
    tied = _names(classify_params(_Tiny(tied=True)))
    assert tied["head"] == [] and "tok_emb.weight" in tied["embed"]


def test_optim_group_override():
    model = _Tiny()
    model.blocks[0].attn.c_k.weight.optim_group = "scalar"
    groups = _names(classify_params(model))
    assert "blocks.0.attn.c_k.weight" in groups["scalar"]


def test_build_optimizers_and_step():
    torch.manual_seed(8)
    cfg = copy.deepcopy(pr1855().optim)
    model = _Tiny(tied=True)
    opts = build_optimizers(model, cfg, tied=True)
    assert set(opts.optimizers) == {"muon", "adam"}
    assert opts.summary() == {"muon": 11, "embed": 2, "scalar": 20}
    assert opts.summary(numel=True)["embed"] == 32 * 16 + 64 * 8
    adam = opts.optimizers["adam"]
    assert adam.defaults["betas"] == (0.9, 0.99) and adam.defaults["eps"] == 1e-8
    idx = torch.randint(0, 32, (2, 5))
    snap = opts.state_dict()
    model(idx).square().mean().backward()
    opts.step(lr_mult=0.5, step=750)
    lrs = opts.lrs()
    assert lrs["muon"] == pytest.approx(0.5 * cfg.matrix_lr)
    assert lrs["embed"] == pytest.approx(0.5 * cfg.tied_embed_lr)
    assert lrs["scalar"] == pytest.approx(0.5 * cfg.scalar_lr)
    g = {g["name"]: g for o in opts.optimizers.values() for g in o.param_groups}
    assert g["muon"]["momentum"] == pytest.approx(0.945) and g["muon"]["weight_decay"] == cfg.muon_wd
    assert g["muon"]["coeffs"] == "polar_express" and g["muon"]["row_normalize"] is True
    assert g["embed"]["weight_decay"] == cfg.embed_wd and g["scalar"]["weight_decay"] == cfg.adam_wd
    assert len(opts.optimizers["muon"].state) == 9  # c_k gets no gradient: skipped
    # the snapshot taken before the step rolls the state back (compile warm-up)
    opts.load_state_dict(snap)
    assert len(opts.optimizers["muon"].state) == 0 and len(adam.state) == 0
    opts.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_build_optimizers_untied_lrs():
    cfg = baseline().optim
    opts = build_optimizers(_Tiny(tied=False), cfg, tied=False)
    opts.step(1.0, 0)  # no grads: only sets the lrs
    lrs = opts.lrs()
    assert lrs["embed"] == cfg.embed_lr and lrs["head"] == cfg.head_lr and lrs["muon"] == cfg.matrix_lr
    g = {g["name"]: g for g in opts.optimizers["adam"].param_groups}
    assert g["head"]["weight_decay"] == 0.0
    assert opts.optimizers["muon"].param_groups[0]["momentum"] == pytest.approx(0.85)


def test_clip_grad_norm():
    model = nn.Linear(4, 4, bias=False)
    model.weight.grad = torch.full((4, 4), 1.0)  # norm 4
    assert clip_grad_norm(model, 0).item() == 0.0 and model.weight.grad[0, 0] == 1.0
    assert clip_grad_norm(model, 2.0).item() == pytest.approx(4.0)
    assert model.weight.grad.norm().item() == pytest.approx(2.0, rel=1e-4)


# ---------------------------------------------------------------- EMA

def test_ema_math_and_round_trip():
    model = nn.Linear(3, 2)
    model.register_buffer("stat", torch.zeros(2))
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    model.weight.data = model.weight.data.bfloat16()  # bf16 live weight, fp32 shadow (tok_emb)
    w0 = {k: v.float().clone() for k, v in model.state_dict().items()}
    ema = EMA(model, 0.9)
    assert set(ema.shadow) == {"weight", "bias", "stat"}  # the integer buffer is not averaged
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    with torch.no_grad():
        model.weight.add_(1.0)
        model.bias.add_(2.0)
        model.stat.fill_(5.0)
    w1 = {k: v.float().clone() for k, v in model.state_dict().items()}
    ema.update(model)
    ema.update(model)
    for k in ema.shadow:  # two updates towards a constant w1
        want = 0.81 * w0[k] + 0.19 * w1[k]
        torch.testing.assert_close(ema.shadow[k], want)
    saved = ema.state_dict()
    ema.update(model)
    ema.load_state_dict(saved)
    torch.testing.assert_close(ema.shadow["stat"], torch.full((2,), 0.95))
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.bias.detach(), ema.shadow["bias"])
    torch.testing.assert_close(model.stat, torch.full((2,), 0.95))


def test_ema_rounds_as_the_records_update():
    """Bit for bit the records' `ema_t.mul_(d).add_(t, alpha=1 - d)` (#1855 `train_model`, also #1787 and
    #1667), a bf16 live weight included, over many steps; lerp, the form pgolf had, drifts from it (the
    records' average settles at w * (1 + 4.4e-6) at d = 0.9965, as fp32(d) + fp32(1 - d) != 1)."""
    shadow, ref, lerp = _ema_beside_the_records_update(nn.Linear(64, 48), steps=300)
    for k in ref:
        assert torch.equal(shadow[k], ref[k]), k
    assert any(not torch.equal(lerp[k], ref[k]) for k in ref)


def _ema_beside_the_records_update(model: nn.Module, steps: int, d: float = 0.9965):
    """`EMA.update` after each of `steps` random moves of `model` (its weight made bf16, as tok_emb), beside
    the records' per-tensor `mul_(d).add_(t, alpha=1 - d)` and lerp: (EMA's shadow, the records', lerp's)."""
    torch.manual_seed(0)
    model.weight.data = model.weight.data.bfloat16()
    ema = EMA(model, d)
    ref = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    lerp = {k: v.clone() for k, v in ref.items()}
    with torch.no_grad():
        for _ in range(steps):
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
            ema.update(model)
            for k, t in model.state_dict().items():
                ref[k].mul_(d).add_(t.detach(), alpha=1.0 - d)
                lerp[k].lerp_(t.detach().float(), 1.0 - d)
    return ema.shadow, ref, lerp


def test_crown_q_penalty_value_and_gradient():
    from torch import nn

    from pgolf.optim.crownq import crown_q_penalty

    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    ws = [net[0].weight, net[2].weight]
    want = sum(((w.detach() ** 2) * (w.detach().abs().amax(1, keepdim=True) / 15) ** 2).mean() for w in ws) / 12
    p = crown_q_penalty(net, 15)
    assert p.item() == pytest.approx(want.item(), rel=1e-6)
    p.backward()
    for w in ws:  # the row step is a constant: d/dw = 2 w Delta^2 / (12 numel)
        delta2 = (w.detach().abs().amax(1, keepdim=True) / 15) ** 2
        assert torch.allclose(w.grad, 2 * w.detach() * delta2 / (12 * w.numel()), atol=1e-9)


def test_crown_q_only_in_the_warm_down_of_an_optimizer_step():
    from pgolf.model import build_model
    from pgolf.presets import get_preset
    from pgolf.train import optimizer_step

    cfg = get_preset("cpu-smoke", ["model.num_layers=2", "model.model_dim=32", "model.num_heads=2",
                                   "model.num_kv_heads=1", "model.vocab_size=64", "optim.crown_q_lambda=50.0"])
    x = torch.randint(0, 64, (2, 16))

    def after(lr_mult, oc):
        torch.manual_seed(0)
        model = build_model(cfg)
        opt = build_optimizers(model, cfg.optim, tied=True)
        optimizer_step(model, model, opt, None, [(x, x)], 0.0, lr_mult, 0, oc)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = after(0.4, None)
    assert torch.equal(after(0.9, cfg.optim), after(0.9, None))  # above the threshold: off
    assert not torch.allclose(after(0.4, cfg.optim), plain)  # below 0.5: the penalty moves the weights
    assert get_preset("pr430").optim.crown_q_lambda == 0.01


def test_compiled_newton_schulz_steps_as_the_eager_one():
    """`compile_ns` runs Newton-Schulz under torch.compile (the trainer's "inductor" on CUDA, as the records
    compile theirs); the wiring is checked here with the aot_eager backend on the CPU, where the
    arithmetic is the eager one: the same update, and one graph per bank shape."""
    from pgolf.optim import muon as M

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    M.compiled_zeropower.cache_clear()
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(16, 8)) for _ in range(2)] + [nn.Parameter(torch.randn(8, 24))]
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    eager, compiled = Muon(ps, lr=0.05), Muon(twins, lr=0.05, compile_ns="aot_eager")
    assert eager.zeropower is M.zeropower and compiled.zeropower is M.compiled_zeropower("aot_eager")
    for _ in range(2):
        for p, q in zip(ps, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        eager.step()
        compiled.step()
    for p, q in zip(ps, twins):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # banks (2, 16, 8) and (1, 8, 24)


@pytest.mark.gpu
def test_inductor_newton_schulz_on_cuda_is_as_close_to_the_polar_factor_as_eager():
    """On CUDA in bf16, Inductor fuses the element-wise parts of each iteration (fewer roundings): its
    result differs from eager at bf16 level and is no farther from the float64 iteration."""
    from pgolf.optim.muon import compiled_zeropower, zeropower

    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    g = torch.randn(3, 512, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    ref = zeropower(g.double(), 5, "polar_express", torch.float64)
    eager = zeropower(g, 5, "polar_express").double()
    fused = compiled_zeropower("inductor")(g, 5, "polar_express").double()
    err = {k: float((v - ref).norm() / ref.norm()) for k, v in (("eager", eager), ("fused", fused))}
    assert err["fused"] < 0.1 and err["fused"] <= 1.2 * err["eager"], err


@pytest.mark.gpu
def test_ema_on_cuda_rounds_as_the_records_per_tensor_update():
    """The foreach kernels on CUDA give what the records' per-tensor `mul_(d).add_(t, alpha=1 - d)` gives."""
    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    shadow, ref, _ = _ema_beside_the_records_update(nn.Linear(512, 384).cuda(), steps=50)
    for k in ref:
        assert torch.equal(shadow[k], ref[k]), k
