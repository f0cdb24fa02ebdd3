"""The four conditions of Issue #1017 for LoRA TTT, phased TTT, score-first SGD TTT and the Hedge mixer.

Each condition is checked on the real method (it must pass) and on a test double that breaks it on
purpose (the check must fail), so no test can pass vacuously:
1. causal         — perturbing a token leaves every token scored before it bit-identical;
                    double: updates before scoring (ledger off, so only the causal check can see it).
2. normalised     — every scored distribution is checked over the full vocabulary;
                    double: a distribution with 1% extra mass; the #430 clamped trigram bucket.
3. score first    — every update is declared with its positions, all scored before;
                    double: updates before scoring.
4. single pass    — every target scored exactly once; double: scores a chunk a second time.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.eval.hedge import HedgeMixer, HedgeTTT
from pgolf.eval.legality import LegalityError, audit_trace, causal_diff, check_causal
from pgolf.eval.lora_ttt import LoRATTT
from pgolf.eval.phased import PhasedTTT
from pgolf.eval.sgd_ttt import SGDTTT
from test_eval_common import BOS, V, one_thread, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401

# ---- the test doubles


class UpdateFirst:
    """Swaps the order: update on a chunk, then score it (what Issue #402 bans)."""

    def step(self, unit):
        self.update(unit)
        self.score(unit)


class Rescore:
    """Scores each chunk again after updating on it (a second pass)."""

    def step(self, unit):
        self.score(unit)
        self.update(unit)
        self.score(unit)


class ExtraMass:
    """A 'distribution' with 1% too much mass (like scoring only the target and filling in the rest)."""

    def distribution(self, logits, *args):
        return super().distribution(logits, *args) + 0.01


class PhasesEarly:
    """Phased TTT whose global SGD also trains on the next batch's documents, not yet scored."""

    def phase_docs(self, k):
        b = next(b for b, ks in self.fire.items() if k in ks)
        # the next batch first (the last SGD chunk is skipped), then the legal prefix
        return np.concatenate([self.batches[b + 1], super().phase_docs(k)])


class TablesFirst:
    """A Hedge mixer that adds the batch's targets to its tables before scoring them."""

    def distribution(self, logits, positions):
        pos = np.unique(positions)
        self.mix_update(pos, self.tok[torch.from_numpy(pos + 1)], None)
        return super().distribution(logits, positions)


class ClampedTrigram(HedgeMixer):
    """The #430 trigram expert: (T[h] + a) / (max(R[h], 1) + a V) leaves empty buckets under-normalised."""

    def experts(self, logp_neural, prev2, prev1):
        p = super().experts(logp_neural, prev2, prev1)
        from pgolf.eval.hedge import trigram_bucket
        h = trigram_bucket(prev2, prev1, self.buckets)
        a = self.alpha
        p[3] = (self.tri[h].double() + a) / (self.tri_rows[h].clamp_min(1) + a * self.V)[:, None]
        return p


def double(base, mixin):
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})


# ---- the methods under test

def _cfg(method: str):
    cfg = tiny_cfg()
    cfg.ttt.method = {"phased": "lora", "sgd688": "sgd"}.get(method, method)
    cfg.ttt.phases = 2 if method == "phased" else 0
    if method == "sgd688":  # every #688-family extra on: ramp, byte-weighted CE, Polyak scoring, temperature
        t = cfg.ttt
        t.sgd_lr_ramp, t.sgd_byte_weighted, t.sgd_polyak, t.sgd_temperature = 3.0, True, 0.9, 0.9
        t.sgd_optimizer, t.sgd_params = "adamw", "last2"
    return cfg


RUNNERS = {"lora": LoRATTT, "phased": PhasedTTT, "sgd": SGDTTT, "hedge": HedgeTTT, "sgd688": SGDTTT}
UPDATE_FIRST = {"lora": double(LoRATTT, UpdateFirst), "phased": double(PhasedTTT, PhasesEarly),
                "sgd": double(SGDTTT, UpdateFirst), "hedge": double(HedgeTTT, TablesFirst),
                "sgd688": double(SGDTTT, UpdateFirst)}
METHODS = list(RUNNERS)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cfg = tiny_cfg()
    return tiny_model(cfg), tiny_val()


def run(method, model, val, cls=None, **stream_kw):
    stream = stream_for(val, keep_trace=True, **stream_kw)
    runner = (cls or RUNNERS[method])(model, val, _cfg(method), stream)
    out = runner.run()
    return stream, out, runner


def pick_position(method, model, val):
    """A target scored in the middle of a chunk that will be trained on (so a leak would show)."""
    cfg = _cfg(method)
    tokens = val.tokens
    if method in ("sgd", "hedge", "sgd688"):
        p = cfg.ttt.sgd_chunk_tokens + cfg.ttt.sgd_chunk_tokens // 2
    elif method == "lora":
        from pgolf.eval.trace import find_docs
        d = find_docs(tokens, BOS)
        i = int(np.argmax(d.lengths))
        p = int(d.starts[i]) + cfg.ttt.chunk_size + cfg.ttt.chunk_size // 2
    else:  # phased: late in the batch scored right after the first global phase
        r = PhasedTTT(model, val, cfg, stream_for(val))
        b = min(r.fire)
        doc = r.batches[b + 1][-1]
        p = int(r.docs.ends[doc]) - 2
    while int(tokens[p + 1]) == BOS:  # never perturb a document boundary
        p -= 1
    return p


def trace_of(method, model, cls=None):
    def f(tokens):
        val = tiny_val()
        val.tokens = tokens
        stream, _, _ = run(method, model, val, cls=cls, strict=False)
        return stream.trace()
    return f


# ---- 1. causal

@pytest.mark.parametrize("method", METHODS)
def test_causal(method, setup):
    model, val = setup
    p = pick_position(method, model, val)
    a = trace_of(method, model)(val.tokens)
    from pgolf.eval.legality import perturb
    b = trace_of(method, model)(perturb(val.tokens, p + 1, V, avoid=(BOS,)))
    assert causal_diff(a, b, p) is None
    k = int(np.flatnonzero(a.position == p)[0])
    assert not np.array_equal(a.loss[k:], b.loss[k:])  # the perturbation does reach later scores


@pytest.mark.parametrize("method", METHODS)
def test_causal_check_catches_update_before_score(method, setup):
    model, val = setup
    p = pick_position(method, model, val)
    first = check_causal(trace_of(method, model, UPDATE_FIRST[method]), val.tokens, p, V, BOS)
    assert first is not None  # a token scored before the perturbed one changed


# ---- 2. normalised over the full vocabulary

@pytest.mark.parametrize("method", METHODS)
def test_normalised(method, setup):
    model, val = setup
    stream, out, _ = run(method, model, val, check_rows=0)  # check every row of every distribution
    assert out["tokens"] == val.num_targets


@pytest.mark.parametrize("method", METHODS)
def test_normalisation_check_refuses_extra_mass(method, setup):
    model, val = setup
    with pytest.raises(LegalityError, match="sums to 1"):
        run(method, model, val, cls=double(RUNNERS[method], ExtraMass))


def test_hedge_refuses_the_430_trigram_expert(setup):
    model, val = setup
    stream = stream_for(val)
    runner = HedgeTTT(model, val, _cfg("hedge"), stream)
    tc = runner.tc
    runner.mixer = ClampedTrigram(V, alpha=tc.hedge_alpha, eta=tc.hedge_eta, buckets=tc.hedge_trigram_buckets)
    with pytest.raises(LegalityError, match="hedge expert 'trigram'"):
        runner.run()


def test_hedge_experts_are_distributions_and_weights_move(setup):
    model, val = setup
    stream, _, runner = run("hedge", model, val)
    w = runner.mixer.weights()
    assert abs(float(w.sum()) - 1) < 1e-12 and not torch.allclose(w, torch.softmax(torch.tensor(
        [2.0, 0, 0, 0], dtype=torch.float64), 0))
    assert int(runner.mixer.uni.sum()) == val.num_targets  # every scored target, after it was scored


# ---- 3. score before update

@pytest.mark.parametrize("method", METHODS)
def test_score_before_update(method, setup):
    model, val = setup
    stream, out, _ = run(method, model, val)
    assert out["updates"] > 0
    rep = audit_trace(stream.trace(), val.num_targets)
    assert rep["ok"], rep["violations"]


@pytest.mark.parametrize("method", METHODS)
def test_update_before_score_is_refused(method, setup):
    model, val = setup
    with pytest.raises(LegalityError, match="score before update"):
        run(method, model, val, cls=UPDATE_FIRST[method])
    stream, _, _ = run(method, model, val, cls=UPDATE_FIRST[method], strict=False)
    rep = audit_trace(stream.trace(), val.num_targets)  # and the trace alone shows it
    assert not rep["ok"] and any("score before update" in v for v in rep["violations"])


# ---- 4. single pass

@pytest.mark.parametrize("method", METHODS)
def test_single_pass(method, setup):
    model, val = setup
    stream, _, _ = run(method, model, val)
    t = stream.trace()
    assert np.array_equal(np.sort(t.position), np.arange(val.num_targets))


@pytest.mark.parametrize("method", METHODS)
def test_second_pass_is_refused(method, setup):
    model, val = setup
    with pytest.raises(LegalityError, match="single pass"):
        run(method, model, val, cls=double(RUNNERS[method], Rescore))
    stream, _, _ = run(method, model, val, cls=double(RUNNERS[method], Rescore), strict=False)
    rep = audit_trace(stream.trace(), val.num_targets)
    assert not rep["ok"] and any("single pass" in v for v in rep["violations"])
