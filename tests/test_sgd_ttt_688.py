"""The #688 family's extras of score-first SGD TTT (docs/records/hedge-stack.md §6.2): LR ramp, byte-weighted CE,
Polyak-averaged scoring, entropy-adaptive temperature. Legality of the combination is in
test_legality.py (method "sgd688")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgolf.errors import PgolfError
from pgolf.eval.sgd_ttt import SGDTTT, adaptive_temperature, ramped_lr, tempered_log_probs
from pgolf.eval.ttt_base import cosine_lr
from test_eval_common import one_thread, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401


def test_lr_ramp_reaches_its_multiple_at_30_percent():
    n = 100
    assert ramped_lr(1.0, 0, n, 3.0) == 1.0
    assert ramped_lr(1.0, 30, n, 3.0) == pytest.approx(3.0 * cosine_lr(1.0, 30, n))
    assert ramped_lr(1.0, 15, n, 3.0) == pytest.approx(2.0 * cosine_lr(1.0, 15, n))
    assert ramped_lr(1.0, 80, n, 3.0) == pytest.approx(3.0 * cosine_lr(1.0, 80, n))
    assert all(ramped_lr(0.5, c, n, 1.0) == cosine_lr(0.5, c, n) for c in range(n))  # off = #549
    peak = max(range(n), key=lambda c: ramped_lr(1.0, c, n, 3.0))
    assert 25 <= peak <= 35 and ramped_lr(1.0, peak, n, 3.0) == pytest.approx(2.38, abs=0.03)  # as recorded


def test_temperature_formula_and_normalisation():
    V = 64
    flat = torch.zeros(1, V)  # H = ln V: tau = 1
    peaked = torch.full((1, V), -30.0)
    peaked[0, 3] = 30.0  # H ~ 0: tau = 1 - (1 - T) = T
    assert adaptive_temperature(flat, 0.98).item() == pytest.approx(1.0)
    assert adaptive_temperature(peaked, 0.98).item() == pytest.approx(0.98, abs=1e-4)
    assert adaptive_temperature(peaked, 0.5).item() == pytest.approx(0.9)  # clamped
    z = torch.randn(5, 7, V) * 3
    lp = tempered_log_probs(z, 0.98)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5, 7), atol=1e-5)
    H = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1, keepdim=True)
    tau = 1 - 0.02 * (1 - H / math.log(V))
    assert torch.allclose(lp, torch.log_softmax(z / tau, -1), atol=1e-5)
    assert torch.equal(tempered_log_probs(z, 1.0), torch.log_softmax(z, -1))


def _runner(**ttt):
    cfg = tiny_cfg()
    cfg.ttt.method = "sgd"
    for k, v in ttt.items():
        setattr(cfg.ttt, k, v)
    model, val = tiny_model(cfg), tiny_val()
    return SGDTTT(model, val, cfg, stream_for(val)), val


def _after_first_update(runner):
    for p in runner.model.parameters():
        p.requires_grad_(False)
    for p in runner.params:
        p.requires_grad_(True)
    runner.score(0)
    runner.update(0)
    return [p.detach().clone() for p in runner.params]


def test_byte_weighting_changes_the_update_only_through_the_weights():
    plain, _ = _runner()
    uniform, val = _runner(sgd_byte_weighted=True)
    uniform.target_bytes = np.full_like(uniform.target_bytes, 3.0)  # equal weights: the plain mean
    for a, b in zip(_after_first_update(plain), _after_first_update(uniform)):
        assert torch.allclose(a, b, atol=1e-6)
    weighted, _ = _runner(sgd_byte_weighted=True)  # tiny_val's 1-4 bytes per target
    got = _after_first_update(weighted)
    plain2, _ = _runner()
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(got, _after_first_update(plain2)))


def test_polyak_weights_score_later_chunks_and_raw_weights_keep_training(monkeypatch):
    import pgolf.eval.sgd_ttt as mod

    runner, _ = _runner(sgd_polyak=0.9, sgd_epochs=1)
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    after = dict(zip([n for n, _ in runner.model.named_parameters()], _after_first_update(runner)))
    seen = []
    real = mod.score_windows

    def spy(model, *args, **kw):  # the weights the scoring forward actually uses
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kw)

    monkeypatch.setattr(mod, "score_windows", spy)
    runner.score(1)
    name = next(iter(after))
    expect = 0.9 * before[name] + 0.1 * after[name]  # one step: ema = d * init + (1 - d) * w
    assert torch.allclose(seen[0][name], expect, atol=1e-6)
    assert not torch.allclose(seen[0][name], after[name], atol=1e-6)
    assert torch.equal(runner.model.state_dict()[name], after[name])  # the raw weights are back
    with runner.scoring_weights(0):  # chunk 0 is scored by the raw weights (nothing averaged before it)
        assert torch.equal(runner.model.state_dict()[name], after[name])


def test_bad_extra_settings_are_one_error():
    with pytest.raises(PgolfError, match="ttt.sgd_polyak"):
        _runner(sgd_polyak=1.0)
    with pytest.raises(PgolfError, match="sgd_lr_ramp"):
        _runner(sgd_lr_ramp=0.5)


def test_pr430_preset_turns_every_extra_on():
    from pgolf.presets import get_preset

    t = get_preset("pr430").ttt
    assert (t.sgd_lr_ramp, t.sgd_byte_weighted, t.sgd_polyak, t.sgd_temperature) == (3.0, True, 0.998, 0.98)
    assert (t.method, t.sgd_optimizer, t.sgd_params, t.sgd_lr, t.sgd_chunk_tokens) == ("hedge", "adamw", "last2",
                                                                                      5e-4, 32_768)
