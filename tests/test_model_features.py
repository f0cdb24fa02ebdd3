"""Every model feature is live (no dead switch), token mixing and attention never cross a BOS, and the
per-row LoRA adapters act where they should and only on their own row.

Each "live" test compares two forwards of a tiny model whose weights are all off their init (so no
zero-initialised projection hides a path) and requires a clear difference (> 1e-3).
"""
import pytest
import torch

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import ALL_PRESETS, copy_weights, max_diff, tiny_model, tokens
from pgolf.model import BatchedLoRA
from pgolf.model.lora import TARGETS

LIVE = 1e-3  # a feature's effect on the final hidden state must exceed this
SAME = 1e-6  # "unchanged" (the brief's allclose bound; most checks are in fact bit-exact)


def three_docs(T: int = 40, starts: tuple[int, ...] = (0, 13, 30)):
    """Two rows of random ids with a BOS at each of `starts` (three documents per row)."""
    return tokens(T=T, bos_at=starts)


def replaced(idx, start: int, end: int, seed: int):
    """A copy of `idx` whose positions [start, end) hold other random ids (one document rewritten)."""
    out = idx.clone()
    out[:, start:end] = tokens(T=end - start, seed=seed)
    return out

# ---------------------------------------------------------------- parameters that must matter

PARAMS = [  # (id, preset, overrides, parameter-name substring, value it is reset to)
    ("smear-gated-lambda", "pr1855", [], "smear_lambda", 0.0),
    ("smear-gated-weight", "pr1855", [], "smear_gate.weight", 0.0),
    ("smear-channel", "pr430", [], "smear_gate", 0.0),
    ("bigram-table", "pr430", [], "bigram.embed", 0.0),
    ("bigram-proj", "pr430", [], "bigram.proj", 0.0),
    ("bigram-scale", "pr430", [], "bigram.bigram_scale", 0.05),
    ("ve-proj", "pr430", [], "ve.proj", 0.0),
    ("ve-layer-scales", "pr430", [], "ve.ve_layer_scales", 1.0),
    ("gate-attn-out", "pr1790", [], "attn_gate_proj", 0.0),
    ("gate-attn-out-q", "pr1790", ["model.attn_gate_input=q"], "attn_gate_proj", 0.0),
    ("gate-dense", "pr1784", [], "attn_gate_w", 0.0),
    ("gate-sparse", "pr1855", [], "attn_gate_w", 0.0),
    ("gate-head-scalar", "pr430", [], "attn.attn_gate", 1.0),
    ("value-residual", "pr430", [], "lambda_v", 0.0),
    ("skip-gates", "pr1855", [], "skip_gates", 0.0),
    ("skip-weights", "baseline", [], "skip_weights", 1.0),
    ("resid-mix", "baseline", [], "resid_mix", 0.0),
    ("lanes-post-lambdas", "pr1855", [], "parallel_post_lambdas", 1.0),
    ("lanes-resid-lambdas", "pr1855", [], "parallel_resid_lambdas", 1.1),
    ("learned-carry-alpha", "pr1855", ["model.recur_carry=learned"], "recur_alpha", 0.0),
    ("qk-gain", "baseline", [], "q_gain", 1.5),
]


@pytest.mark.parametrize("preset,extra,name,init", [p[1:] for p in PARAMS], ids=[p[0] for p in PARAMS])
def test_feature_parameters_change_the_output(preset, extra, name, init):
    """Moving a feature's parameters off their init value changes the model's hidden state."""
    model = tiny_model(preset, *extra)
    idx = three_docs()
    with torch.no_grad():
        h = model.hidden(idx)
        hit = [n for n, p in model.named_parameters() if name in n]
        assert hit, f"no parameter named *{name}*"
        for n, p in model.named_parameters():
            if name in n:
                p.fill_(init)
        assert max_diff(h, model.hidden(idx)) > LIVE


# ---------------------------------------------------------------- switches that must matter

LOOPING = {"looping=on": True, "looping=off": False}  # GPT.looping: a model attribute, not a config field

SWITCHES = [  # (id, preset, settings of model A, settings of model B); weights copied A -> B
    ("xsa", "pr1855", [], ["model.xsa_last_n=0"]),
    ("xsa-last-2", "baseline", ["model.xsa_last_n=2"], []),
    ("frozen-carry", "pr1801", [], ["model.recur_carry=none"]),
    ("partial-rope", "pr1855", ["model.rope_dims=8"], ["model.rope_dims=0"]),
    ("partial-rope-4", "pr1855", ["model.rope_dims=4"], ["model.rope_dims=8"]),
    ("ntk-factor", "pr430", ["model.rope_ntk_factor=2.0"], ["model.rope_ntk_factor=1.0"]),
    ("ln-scale", "pr1855", [], ["model.ln_scale=false"]),
    ("leaky-relu2", "pr1855", [], ["model.activation=relu2"]),
    ("leaky-slope", "pr1855", ["model.leaky_slope=0.5"], ["model.leaky_slope=0.25"]),
    ("smear-channel-vs-off", "pr430", [], ["model.smear_gate=off"]),
    ("sparse-gate-scale", "pr1855", ["model.attn_gate_scale=0.5"], ["model.attn_gate_scale=1.0"]),
    ("attn-out-gate-input", "pr1790", ["model.attn_gate_input=block"], ["model.attn_gate_input=q"]),
    ("lanes-vs-none", "pr1855", [], ["model.parallel_start_layer=-1"]),
    ("skip-gates-vs-add", "pr1855", [], ["model.skip_gates=false"]),
    ("unet-skips", "baseline", [], ["model.unet_skips=false"]),
    ("qk-norm", "baseline", [], ["model.qk_norm=false"]),
    ("doc-mask", "pr1855", [], ["model.doc_mask=false"]),
    ("smear-bos-mask", "pr1855", [], ["model.smear_bos_mask=false"]),
    ("looping", "pr1765", ["looping=on"], ["looping=off"]),  # depth recurrence
]


def _switched(preset: str, settings: list[str], randomize: bool = True):
    loop = [LOOPING[s] for s in settings if s in LOOPING]
    return tiny_model(preset, *[s for s in settings if s not in LOOPING], randomize=randomize,
                      looping=loop[0] if loop else None)


@pytest.mark.parametrize("preset,a,b", [s[1:] for s in SWITCHES], ids=[s[0] for s in SWITCHES])
def test_feature_switches_change_the_output(preset, a, b):
    """The same weights under two settings of a switch give clearly different hidden states."""
    ma = _switched(preset, a)
    mb = _switched(preset, b, randomize=False)
    copy_weights(ma, mb)
    idx = three_docs()
    with torch.no_grad():
        assert max_diff(ma.hidden(idx), mb.hidden(idx)) > LIVE


def test_logit_softcap_changes_the_logits():
    """logits = c*tanh(u/c): cap 30 differs from cap 5 and from no cap (hidden state is untouched)."""
    m30 = tiny_model("baseline")
    with torch.no_grad():
        m30.tok_emb.weight.mul_(10)  # raw logits of order 10
    m5 = tiny_model("baseline", "model.logit_softcap=5.0", randomize=False)
    m0 = tiny_model("baseline", "model.logit_softcap=0.0", randomize=False)
    copy_weights(m30, m5), copy_weights(m30, m0)
    idx = tokens()
    with torch.no_grad():
        z30, z5, z0 = m30(idx), m5(idx), m0(idx)
        assert torch.equal(m30.hidden(idx), m5.hidden(idx))
        assert max_diff(z30, z5) > 1.0 and max_diff(z30, z0) > LIVE
        assert z5.abs().max() <= 5.0 and z0.abs().max() > 5.0


# ---------------------------------------------------------------- documents never mix

SMEAR_KINDS = [("pr1855", []), ("pr430", ["model.smear_bos_mask=true"]), ("pr1790", ["model.smear_bos_mask=true"])]


@pytest.mark.parametrize("preset,extra", SMEAR_KINDS, ids=["gated", "channel+bigram", "gated-w24"])
def test_smear_and_bigram_with_bos_mask_never_mix_across_documents(preset, extra):
    """With the BOS mask, x0 from a BOS on is independent of every token before it; without, it is not."""
    model = tiny_model(preset, *extra)
    idx = three_docs()
    other = replaced(idx, 1, 13, seed=7)  # a different first document
    with torch.no_grad():
        assert torch.equal(model.embed(idx)[:, 13:], model.embed(other)[:, 13:])
        model.cfg.smear_bos_mask = False  # negative control: the record's pre-#1851 leak
        assert max_diff(model.embed(idx)[:, 13], model.embed(other)[:, 13]) > LIVE


def _losses(model, idx):
    with torch.no_grad():
        return model(idx[:, :-1], idx[:, 1:], reduction="none")


MASKS_ON = ["model.doc_mask=true", "model.smear_bos_mask=true"]
MASK_CASES = [(f"isolated-{p}", p, MASKS_ON, True) for p in ALL_PRESETS] + [  # (id, preset, settings, isolated)
    ("no-doc-mask", "baseline", ["model.doc_mask=false"], False),
    ("no-masks", "pr1855", ["model.doc_mask=false", "model.smear_bos_mask=false"], False),
    ("smear-leaks", "pr1855", ["model.smear_bos_mask=false"], False),
    ("bigram-channel-leak", "pr430", ["model.doc_mask=true", "model.smear_bos_mask=false"], False),
]


@pytest.mark.parametrize("preset,settings,isolated", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_documents_are_isolated_exactly_when_both_masks_are_on(preset, settings, isolated):
    """doc_mask (attention) + the smear BOS mask (token mixing): rewriting an earlier document leaves every
    later document's losses unchanged. Without either mask (negative control), the earlier document leaks."""
    model = tiny_model(preset, *settings)
    idx = three_docs(T=49, starts=(0, 16, 31))  # documents [0, 16), [16, 31), [31, 48] in each row
    base = _losses(model, idx)
    first = _losses(model, replaced(idx, 1, 16, seed=5))
    if not isolated:
        assert max_diff(first[:, 16:], base[:, 16:]) > LIVE
        return
    assert max_diff(first[:, 16:], base[:, 16:]) < SAME
    middle = _losses(model, replaced(idx, 17, 31, seed=6))
    assert max_diff(middle[:, 31:], base[:, 31:]) < SAME and max_diff(middle[:, :16], base[:, :16]) < SAME
    assert max_diff(middle[:, 16:31], base[:, 16:31]) > LIVE  # the changed document itself does change


# ---------------------------------------------------------------- LoRA

def _lora(model, targets=TARGETS, batch=2, seed=0):
    torch.manual_seed(seed)
    return BatchedLoRA(model, batch, rank=4, alpha=8.0, targets=targets)


@pytest.mark.parametrize("target", TARGETS)
def test_lora_target_changes_the_output(target):
    """A non-zero B on one target (q, k, v, o, mlp or head) changes the logits; B = 0 leaves them exact."""
    model = tiny_model("pr1855")
    lora = _lora(model, (target,))
    idx = tokens(bos_at=(0, 11))
    with torch.no_grad():
        plain = model(idx)
        assert torch.equal(model(idx, lora=lora), plain)
        lora.B[target].normal_(0, 0.5)
        assert max_diff(model(idx, lora=lora), plain) > LIVE


def test_lora_rows_are_independent():
    """Row r's adapter changes row r only: other rows equal the plain forward bit for bit."""
    model = tiny_model("pr1855")
    lora = _lora(model, batch=3)
    idx = tokens(B=3, bos_at=(0, 11))
    with torch.no_grad():
        plain = model(idx)
        for B in lora.B.values():
            B[:, 1].normal_(0, 0.5)  # row 1 only, every slot
        out = model(idx, lora=lora)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    assert max_diff(out[1], plain[1]) > LIVE


def test_lora_has_one_adapter_per_virtual_slot():
    """Adapters are per virtual layer: slot 16 (the last looped one) acts only when looping is on."""
    model = tiny_model("pr1855", looping=False)
    lora = _lora(model, ("q", "mlp"))
    assert lora.A["q"].shape[0] == 17 and lora.A["mlp"].shape[0] == 17
    idx = tokens(bos_at=(0, 11))
    with torch.no_grad():
        lora.B["mlp"][16].normal_(0, 0.5)
        assert torch.equal(model(idx, lora=lora), model(idx))  # 11 slots: slot 16 unused
        model.looping = True
        assert max_diff(model(idx, lora=lora), model(idx)) > LIVE


def test_lora_alpha_over_rank_scaling():
    """alpha/r scaling (#1765): the delta with alpha=2r is twice the unscaled (alpha=0) one."""
    model = tiny_model("baseline")
    idx = tokens()
    a, b = _lora(model, ("head",), seed=3), _lora(model, ("head",), seed=3)
    b.scale = 8.0 / 4  # alpha 8, rank 4
    a.scale = 1.0
    with torch.no_grad():
        a.B["head"].normal_(0, 0.1)
        b.B["head"].copy_(a.B["head"])
        h = model.hidden(idx)
        base = model.logits(h)
        da, db = model.logits(h, lora=a) - base, model.logits(h, lora=b) - base
    torch.testing.assert_close(db, 2 * da, rtol=1e-5, atol=1e-6)
    assert BatchedLoRA(model, 2, rank=4, alpha=0.0).scale == 1.0
    assert BatchedLoRA(model, 2, rank=4, alpha=8.0).scale == 2.0
