"""Scoring: windows cover every target once, sliding windows, document masking, the trace file."""
from __future__ import annotations

import numpy as np
import pytest

from pgolf.eval.legality import audit_trace, perturb
from pgolf.eval.score import evaluate, score_stream, window_plan
from pgolf.eval.trace import load_trace
from test_eval_common import BOS, V, one_thread, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401


@pytest.mark.parametrize("n,seq,stride", [(100, 32, 0), (100, 32, 8), (96, 32, 0), (20, 32, 4), (65, 16, 5),
                                          (64, 16, 16), (64, 16, 40)])
def test_window_plan_scores_every_target_once(n, seq, stride):
    a, e, s = window_plan(n, seq, stride)
    scored = np.concatenate([np.arange(lo, hi) for lo, hi in zip(s, e)])
    assert np.array_equal(scored, np.arange(n))  # in order, once each
    assert (e - a <= seq).all() and (a <= s).all() and (s < e).all()
    if 0 < stride < seq and n >= seq:
        assert ((e - s)[1:] <= stride).all() and ((e - a) == seq).all()  # full context, last `stride` scored


def test_sliding_scores_in_order_with_more_context():
    cfg = tiny_cfg()
    model, val = tiny_model(cfg), tiny_val()
    flat = stream_for(val, keep_trace=True)
    r0 = score_stream(model, val, 32, 0, 4, stream=flat)
    same = score_stream(model, val, 32, 32, 4)  # stride = window: the same windows
    assert r0["val_loss"] == pytest.approx(same["val_loss"], rel=1e-12)
    slide = stream_for(val, keep_trace=True)
    r1 = score_stream(model, val, 32, 8, 4, stream=slide)
    t = slide.trace()
    assert np.array_equal(t.position, np.arange(val.num_targets)) and r1["tokens"] == val.num_targets
    assert r1["val_loss"] != r0["val_loss"]
    # evaluate() keeps the trainer's contract
    ev = evaluate(model, val, 32, 4)
    assert set(ev) >= {"val_loss", "val_bpb", "tokens", "bytes", "seconds"}
    assert ev["val_bpb"] == pytest.approx(r0["val_bpb"], rel=1e-12)
    assert ev["val_bpb"] == pytest.approx(r0["val_loss"] * r0["tokens"] / (np.log(2) * val.total_bytes), rel=1e-9)


def test_doc_mask_keeps_documents_apart():
    cfg = tiny_cfg()
    model, val = tiny_model(cfg), tiny_val()
    docs = stream_for(val).docs
    d = 3  # perturb a token of document 3; document 4 shares windows with it
    j = int(docs.starts[d]) + 2
    pert = tiny_val()
    pert.tokens = perturb(val.tokens, j, V, avoid=(BOS,))
    later = slice(int(docs.starts[d + 1]), int(docs.ends[d + 1]))

    def losses(v, mask):
        s = stream_for(v, keep_losses=True)
        score_stream(model, v, 32, 8, 4, doc_mask=mask, stream=s)
        return s.losses[later]

    assert np.array_equal(losses(val, True), losses(pert, True))  # attention never crossed the BOS
    assert not np.array_equal(losses(val, False), losses(pert, False))  # without the mask it does
    assert model.cfg.doc_mask is False  # the switch is restored


def test_trace_file_round_trip_and_audit(tmp_path):
    val = tiny_val()
    s = stream_for(val, keep_trace=True)
    s.record([0, 1], None, [0.5, 0.25], [1, 2])
    s.declare_update([0, 1])
    s.record([2], [7], [0.125], [3])
    p = s.trace().save(tmp_path / "t.npz")
    t = load_trace(p)
    assert t.position.tolist() == [0, 1, 2] and t.step.tolist() == [0, 0, 1]
    assert t.loss.dtype == np.float32 and t.bytes.tolist() == [1, 2, 3] and t.doc.tolist() == [0, 0, 7]
    assert audit_trace(t)["ok"] and not audit_trace(t, val.num_targets)["ok"]  # not complete
    t.step[2] = 0  # tampering with the steps is caught
    assert not audit_trace(t)["ok"]
