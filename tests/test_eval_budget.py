"""`eval.max_seconds` enforced: a TTT evaluation that would overrun its budget falls back to scoring
without adaptation, finishes in budget, still scores every token exactly once, and says where.

Time is simulated (the ledger's clock): every position through the trunk costs 1 ms, 3 ms when a
backward follows, so the tests are exact on a shared CPU; one test runs `pgolf eval` on the real clock."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.eval.ttt import run_ttt
from pgolf.eval.ttt_base import ConvergenceLog, Deadline, TimeLedger
from test_eval_common import one_thread, run_ranks, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401

METHODS = [("lora", 0), ("lora", 2), ("sgd", 0), ("hedge", 0)]


class SimClock:
    """Simulated seconds: every position through the trunk costs 1 ms forward and 2 ms more when a
    backward runs through it; advanced by the model's forwards (the runners' copies included)."""

    def __init__(self, model: torch.nn.Module):
        self.t = 0.0
        # a plain function: deepcopy keeps it as it is (a bound method would copy this clock along)
        model.blocks[0].register_forward_hook(lambda module, inputs, output: self.tick(inputs[0], output))

    def tick(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n = x.shape[0] * x.shape[1]
        self.t += n * 1e-3
        if out.requires_grad:
            out.register_hook(lambda grad: self.backward(n))

    def backward(self, n: int) -> None:
        self.t += n * 2e-3

    def __call__(self) -> float:
        return self.t


def _run(method: str, phases: int, budget: float):
    cfg = tiny_cfg()
    cfg.ttt.method, cfg.ttt.phases = method, phases
    cfg.eval.max_seconds = budget
    model, val = tiny_model(cfg), tiny_val(20)
    clock = SimClock(model)
    stream = stream_for(val, keep_trace=True)
    log = ConvergenceLog(None, stream, method=method)
    out = run_ttt(model, val, cfg, stream, log=log, ledger=TimeLedger(budget, clock))
    return out, stream, log, clock(), val.num_targets


@pytest.mark.parametrize("method,phases", METHODS)
def test_overrun_falls_back_and_finishes_in_budget(method, phases):
    full, full_stream, _, full_seconds, n = _run(method, phases, 0.0)  # no budget: adapts throughout
    assert full["ttt_fallback"] is None
    budget = 0.8 * full_seconds
    out, stream, log, seconds, _ = _run(method, phases, budget)
    fb = out["ttt_fallback"]
    assert 0.6 * budget < seconds <= budget  # finished in budget, having adapted while it could
    assert fb["budget_seconds"] == budget and fb["predicted_seconds"] > budget > fb["elapsed_seconds"]
    at = fb["at_token"]
    assert 0 < at < n and at + fb["tokens_without_adaptation"] == n
    # the trace: every target once; up to the fallback exactly the unconstrained run, after it no update
    tr, ref = stream.trace(), full_stream.trace()
    assert np.array_equal(np.sort(tr.position), np.arange(n))
    assert np.array_equal(tr.position[:at], ref.position[:at]) and np.array_equal(tr.loss[:at], ref.loss[:at])
    assert (tr.step[at:] == out["updates"]).all() and (tr.update_at <= at).all()
    assert 0 < out["updates"] < full["updates"]
    assert [r for r in log.rows if r["kind"] == "fallback"][0]["tokens"] == at
    where = ("at_batch", "at_document", "documents_left") if method == "lora" else ("at_chunk", "at_position")
    assert all(k in fb for k in where)


@pytest.mark.parametrize("method,phases", [("lora", 2), ("hedge", 0)])
def test_ample_budget_changes_nothing(method, phases):
    full, _, _, seconds, _ = _run(method, phases, 0.0)
    roomy, _, _, _, _ = _run(method, phases, 1.5 * seconds)
    assert roomy["ttt_fallback"] is None
    assert (roomy["val_loss"], roomy["updates"]) == (full["val_loss"], full["updates"])


def test_deadline_adapts_while_the_rest_still_fits():
    """rate 2 s/unit, half of it scoring: one more adapted unit then 2 plain ones = 4 + 2 + 2 = 8 s,
    inside 95% of 9 s (8.55 s); at 2.25 s/unit (share 4/9) it is 4.5 + 2.25 + 2 = 8.75 s: fall back."""
    t = [0.0]
    d = Deadline(9.0, clock=lambda: t[0])
    with d.scoring():
        t[0] = 2.0
    t[0] = 4.0
    cpu = torch.device("cpu")
    assert not d.overrun(2, 1, 3, cpu, scored=100)
    t[0] = 4.5
    assert d.overrun(2, 1, 3, cpu, scored=120, at_chunk=2)
    assert d.fallback == {"reason": "predicted overrun of eval.max_seconds", "budget_seconds": 9.0,
                          "predicted_seconds": 11.25, "elapsed_seconds": 4.5, "scoring_share": 0.444,
                          "at_token": 120, "at_chunk": 2}
    assert d.overrun(2, 0, 0, cpu, scored=999)  # once fallen back, it stays so
    assert d.result(200)["tokens_without_adaptation"] == 80
    assert not Deadline(0.0, clock=lambda: 1e9).overrun(1, 1, 1, cpu, scored=0)  # 0 = no budget


def test_pgolf_eval_records_the_fallback(sp1024_data, tmp_path, cli):
    """Through the command line, on the real clock: a budget no evaluation can meet falls back after
    the first chunk, and both the printed JSON and result.json say so. (The first validation document
    of the shared sample is longer than these 2,048 tokens: chunked SGD gives several check points.)"""
    from pgolf.presets import get_preset
    from pgolf.model import build_model
    from pgolf.runs import RunDir

    from pgolf.artifact.int8 import export_int8

    cfg = get_preset("cpu-smoke", [f"data.path={sp1024_data}"])
    run = RunDir.create(tmp_path / "run")
    run.write_json("config.json", cfg.to_dict())
    state = build_model(cfg).state_dict()
    torch.save(state, run.file("final_model.pt"))
    run.write_bytes("final_model.int8.ptz", export_int8(state))
    run.finish({"val_bpb": 0.0})
    sets = ["data.val_max_tokens=2048", "ttt.method=sgd", "ttt.sgd_chunk_tokens=512", "eval.max_seconds=1e-6"]
    rc, out, err = cli("eval", run.path, "--artifact", run.file("final_model.int8.ptz"), "--ttt",
                       *sum((["--set", s] for s in sets), []))
    assert rc == 0, err
    fb = out["ttt_fallback"]
    assert fb["at_chunk"] == 1 and fb["budget_seconds"] == 1e-6 and fb["at_token"] == 512
    assert fb["at_token"] + fb["tokens_without_adaptation"] == out["scored_tokens"] == out["val_targets"]
    assert "fallback" in err and RunDir(run.path).result()["ttt_fallback"] == fb


# ---- two ranks (gloo): every rank falls back at the same point, and no collective is left waiting

def _fallbacks(rank: int, world: int) -> dict:
    out = {}
    for method, phases in [("lora", 2), ("sgd", 0)]:  # batches split by rank / chunks shared
        cfg = tiny_cfg()
        cfg.ttt.method, cfg.ttt.phases = method, phases
        model, val = tiny_model(cfg), tiny_val(20)
        res = run_ttt(model, val, cfg, stream_for(val), ledger=TimeLedger(1e-9), rank=rank, world_size=world)
        out[method] = (res["val_loss"], res["tokens"], res["ttt_fallback"], val.num_targets)
    return out


@pytest.mark.slow
def test_two_ranks_fall_back_together():
    got = run_ranks(_fallbacks, 2, wait_s=180)
    for method in ("lora", "sgd"):
        (loss0, tok0, fb0, n), (loss1, tok1, fb1, _) = got[0][method], got[1][method]
        assert loss0 == loss1 and tok0 == tok1 == n  # all-reduced sums over every target, once each
        where = "at_batch" if method == "lora" else "at_chunk"
        assert fb0[where] == fb1[where] == (2 if method == "lora" else 1)  # the first check point
        assert fb0["at_token"] == fb1["at_token"] > 0 and fb0["tokens_without_adaptation"] == n - fb0["at_token"]
