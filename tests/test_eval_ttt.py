"""TTT mechanics: LoRA resets and chunk updates, phase boundaries, gains on a tiny model, 2 ranks = 1 rank."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from pgolf.eval.lora_ttt import LoRATTT
from pgolf.eval.phased import PhasedTTT
from pgolf.eval.score import score_stream
from pgolf.eval.ttt import run_ttt
from pgolf.eval.ttt_base import ConvergenceLog
from test_eval_common import one_thread, run_ranks, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401


class Spy(LoRATTT):
    """Records the adapter and optimizer state at the first chunk and at the end of every batch."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.starts, self.ends = [], []

    def step(self, ch):
        if ch.c == 0:
            self.starts.append((sum(float(b.detach().abs().sum()) for b in self.lora.B.values()),
                                {k: a.detach().clone() for k, a in self.lora.A.items()}, len(self.opt.state)))
        super().step(ch)

    def run_batch(self, b, docs):
        super().run_batch(b, docs)
        self.ends.append({k: a.detach().clone() for k, a in self.lora.A.items()})


@pytest.mark.parametrize("warm", [False, True])
def test_lora_resets_per_batch(warm):
    cfg = tiny_cfg()
    cfg.ttt.warm_start_a = warm
    model, val = tiny_model(cfg), tiny_val(12)
    spy = Spy(model, val, cfg, stream_for(val))
    spy.run()
    assert len(spy.starts) == len(spy.batches) > 2
    for i, (bsum, A, nstate) in enumerate(spy.starts):
        assert bsum == 0.0 and nstate == 0  # B reset, optimizer state zeroed at every batch
        if i:
            kept = all(torch.equal(A[k], spy.ends[i - 1][k]) for k in A)
            assert kept == warm  # A warm-started (PR #1765) or re-drawn
    assert sum(float(b.detach().abs().sum()) for b in spy.lora.B.values()) > 0  # the adapters did train


def test_a_short_batch_trains_adapters_of_its_own():
    """Record `eval_val_ttt_phased`: only a batch of `batch_size` documents reuses `reusable_lora`; a
    shorter one (here the first in the queue, the longest documents) gets new adapters and an
    optimizer that are dropped after it, so the next batch starts from the shared A untouched."""
    cfg = tiny_cfg()
    cfg.ttt.warm_start_a = True  # as the #1765-line records: A carried from batch to batch
    model, val = tiny_model(cfg), tiny_val(11)
    spy = Spy(model, val, cfg, stream_for(val))
    shared, initial = spy.lora, {k: a.detach().clone() for k, a in spy.lora.A.items()}
    seen = []
    step = spy.step

    def step_and_note(ch):
        if ch.c == 0:
            seen.append(spy.lora)
        step(ch)
    spy.step = step_and_note
    spy.run()
    assert [len(b) for b in spy.batches] == [2, 3, 3, 3]
    assert seen[0] is not shared and all(lora is shared for lora in seen[1:]) and spy.lora is shared
    assert all(torch.equal(spy.starts[1][1][k], initial[k]) for k in initial)  # untouched by batch 0
    assert not all(torch.equal(spy.starts[0][1][k], initial[k]) for k in initial)  # its own A, drawn anew
    assert not all(torch.equal(spy.starts[2][1][k], initial[k]) for k in initial)  # batch 1 trained A on


def test_lora_updates_once_per_chunk_never_on_last_chunks():
    cfg = tiny_cfg()
    cfg.ttt.grad_steps = 2
    model, val = tiny_model(cfg), tiny_val(12)
    stream = stream_for(val)
    r = LoRATTT(model, val, cfg, stream)
    r.run()
    C = cfg.ttt.chunk_size
    # a batch updates after every chunk but its longest document's last one
    expect = sum(int(-(-r.docs.lengths[b].max() // C)) - 1 for b in r.batches) * cfg.ttt.grad_steps
    assert stream.step == expect
    assert all(p.requires_grad for p in model.parameters())  # the caller's model is handed back as it was


def test_phase_boundaries_and_convergence_rows(tmp_path):
    cfg = tiny_cfg()
    cfg.ttt.phases, cfg.ttt.prefix_docs = 3, 9
    model, val = tiny_model(cfg), tiny_val(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = stream_for(val)
    log = ConvergenceLog(tmp_path / "ttt.jsonl", stream, method="lora+3phase",
                         baseline=np.zeros(val.num_targets, np.float32))
    r = PhasedTTT(model, val, cfg, stream, log=log)
    assert r.bounds == [3, 6, 9]  # floor(P (k+1) / phases)
    r.run()
    rows = log.rows
    phases = [x for x in rows if x["kind"] == "phase"]
    assert [x["phase"] for x in phases] == [1, 2, 3] and [x["docs"] for x in phases] == [3, 6, 9]
    scored_docs = 0
    for x in rows:  # each phase starts once enough documents are fully scored, never before
        if x["kind"] == "batch":
            scored_docs += x["docs"]
        elif x["kind"] == "phase":
            assert scored_docs >= x["docs"] and x["sgd_steps"] > 0
    assert rows[-1]["kind"] == "done" and rows[-1]["tokens"] == val.num_targets
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # SGD trained a copy
    assert [x["phase"] for x in rows if x["kind"] == "batch"][-1] == 3


def test_ttt_improves_the_tiny_model():
    cfg = tiny_cfg()
    model, val = tiny_model(cfg), tiny_val()
    base = score_stream(model, val, 32, 0, 4)["val_bpb"]
    for method, phases in [("lora", 0), ("lora", 2), ("hedge", 0)]:
        cfg.ttt.method, cfg.ttt.phases = method, phases
        out = run_ttt(model, val, cfg, stream_for(val))
        assert out["val_bpb"] < base - 0.02, (method, phases, out["val_bpb"], base)


# ---- two ranks (gloo) give the one-rank result

def _results(rank: int = 0, world: int = 1) -> dict:
    cfg = tiny_cfg()
    model, val = tiny_model(cfg), tiny_val(14)
    out = {"slide": score_stream(model, val, 32, 8, 4, rank=rank, world_size=world)["val_loss"]}
    for method, phases in [("lora", 0), ("lora", 2), ("sgd", 0), ("hedge", 0)]:
        cfg.ttt.method, cfg.ttt.phases = method, phases
        s = stream_for(val)
        out[f"{method}{phases}"] = run_ttt(model, val, cfg, s, rank=rank, world_size=world)["val_loss"]
    return out


def test_two_ranks_match_one():
    got = run_ranks(_results, 2, wait_s=120)
    one = _results()
    for r in range(2):
        for k in ("slide", "lora0", "lora2", "sgd0"):
            assert got[r][k] == pytest.approx(one[k], rel=1e-5), k  # same tokens, same sums
        assert got[r]["hedge0"] == got[0]["hedge0"]  # per-rank mixers, all-reduced sums


def test_a_chunk_wider_than_the_window_is_refused_before_any_work():
    """ttt.chunk_size above ttt.eval_seq_len was an index error deep in LoRA TTT's window arithmetic."""
    from pgolf.errors import PgolfError
    from pgolf.eval.ttt import runner_key

    cfg = tiny_cfg()
    assert runner_key(cfg) == "lora"
    cfg.ttt.chunk_size = cfg.ttt.eval_seq_len + 1
    with pytest.raises(PgolfError, match=rf"^ttt.chunk_size: {cfg.ttt.chunk_size}: expected <= ttt.eval_seq_len "
                                         rf"{cfg.ttt.eval_seq_len} \(LoRA TTT"):
        runner_key(cfg)
    cfg.ttt.method = "sgd"  # score-first SGD has chunks of its own (ttt.sgd_chunk_tokens)
    assert runner_key(cfg) == "sgd"

