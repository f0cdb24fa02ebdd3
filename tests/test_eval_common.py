"""Shared tiny fixtures for the eval tests (imported by test_eval_*.py and test_legality.py), and the
tests of the pieces every TTT method shares: documents, batches, LR schedule, ledger, warm-up."""
from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable

import numpy as np
import pytest
import torch

from pgolf.config import Config
from pgolf.distributed import teardown
from pgolf.eval.bpb import ValSet
from pgolf.eval.trace import EvalStream, find_docs
from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger, cosine_lr, doc_batches, warmup
from pgolf.model import build_model

BOS, V = 1, 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a CPU shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg() -> Config:
    c = Config(preset="tiny")
    m = c.model
    m.vocab_size, m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult = V, 2, 32, 2, 1, 2.0
    c.train.eval_seq_len = 32
    c.eval.seq_len, c.eval.batch_seqs = 32, 4
    t = c.ttt
    t.lora_rank, t.lora_alpha, t.lora_lr, t.chunk_size, t.eval_seq_len, t.batch_size = 4, 8.0, 1e-2, 8, 32, 3
    t.prefix_docs, t.phases, t.global_chunk_tokens, t.global_batch_seqs, t.global_lr = 6, 0, 64, 4, 1e-2
    t.sgd_chunk_tokens, t.sgd_epochs, t.sgd_lr = 128, 1, 1e-2
    t.hedge_trigram_buckets = 256
    return c


def tiny_model(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the zero-init projections too, so tokens really interact)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def tiny_val(n_docs: int = 20, seed: int = 0, max_len: int = 70) -> ValSet:
    """BOS-delimited documents of varied length; within a document tokens repeat a short motif, so
    adapting to the document pays off."""
    g = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        motif = g.integers(2, V, size=int(g.integers(2, 6)))
        L = int(g.integers(4, max_len))
        body = np.where(g.random(L) < 0.7, np.resize(motif, L), g.integers(2, V, size=L))
        parts.append(np.concatenate([[BOS], body]))
    tokens = torch.from_numpy(np.concatenate(parts).astype(np.int64))
    nbytes = torch.from_numpy(g.integers(1, 5, size=tokens.numel() - 1).astype(np.int16))
    return ValSet(tokens=tokens, bytes=nbytes, doc_starts=torch.nonzero(tokens == BOS).flatten(), byte_source="lut")


def stream_for(val: ValSet, **kw) -> EvalStream:
    return EvalStream(val.num_targets, docs=find_docs(val.tokens, BOS), **kw)


# ---- tests of the shared pieces

def _rank(fn: Callable[[int, int], Any], rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q.put((rank, fn(rank, world)))
    finally:
        teardown()  # destroys the group, then collects (see its docstring)


def run_ranks(fn: Callable[[int, int], Any], world: int = 2, wait_s: float = 120.0) -> dict[int, Any]:
    """`fn(rank, world)` in `world` spawned gloo processes (a module-level function: it is pickled);
    {rank: what it returned}."""
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(fn, r, world, port, q)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=wait_s) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return got


def test_docs_inclusive_of_next_bos_and_prefix():
    t = torch.tensor([5, 1, 7, 8, 1, 9, 1, 4])  # a prefix, then three documents
    d = find_docs(t, 1)
    assert d.starts.tolist() == [0, 1, 4, 6] and d.ends.tolist() == [1, 4, 6, 7]
    # document 1 = tokens[1..4] inclusive of the next BOS: its targets are 7, 8, 1
    assert t[d.starts[1] + 1:d.ends[1] + 1].tolist() == [7, 8, 1]
    assert d.of([0, 3, 4, 6]).tolist() == [0, 1, 2, 3]


def test_doc_batches_sorted_by_length_longest_first():
    val = tiny_val(10)
    docs = find_docs(val.tokens, BOS)
    batches = doc_batches(docs, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(docs)))
    maxes = [docs.lengths[b].max() for b in batches]
    assert maxes == sorted(maxes, reverse=True)
    for b in batches:  # each batch holds neighbours in length order
        assert docs.lengths[b].tolist() == sorted(docs.lengths[b].tolist())


def test_cosine_lr():
    assert cosine_lr(1.0, 0, 5) == 1.0 and abs(cosine_lr(1.0, 4, 5)) < 1e-12
    assert cosine_lr(0.5, 0, 1) == 0.5


def test_time_ledger_and_convergence_log(tmp_path):
    led = TimeLedger(budget_seconds=1.0)
    with led.phase("score"):
        pass
    led.add("ttt", 2.0)
    led.add("phase_1", 0.5)
    d = led.as_dict("ttt")
    assert d["within_budget"] is False and d["ttt_seconds"] == 2.0 and d["phase_1_seconds"] == 0.5
    assert d["total_seconds"] == pytest.approx(2.0, abs=1e-2)  # phases are inside ttt
    s = EvalStream(4)
    log = ConvergenceLog(tmp_path / "ttt.jsonl", s, method="lora", baseline=np.array([1.0, 1, 1, 1], np.float32))
    s.record([0, 1], None, [0.5, 0.5], [1, 1])
    row = log.batch(0)
    assert row["tokens"] == 2 and row["bpb"] < row["bpb_no_ttt"]
    log.phase(1)
    assert len((tmp_path / "ttt.jsonl").read_text().splitlines()) == 2


def test_convergence_baseline_leaves_out_positions_scored_without_ttt_never():
    """Packed validation rows drop a tail that TTT still scores: the running no-TTT figure covers only
    the positions it has, their bytes included (a NaN would poison it, a 0 would read low)."""
    s = EvalStream(4)
    log = ConvergenceLog(None, s, method="lora", baseline=np.array([2.0, 2.0, np.nan, np.nan], np.float32))
    s.record([0, 1, 2, 3], None, [1.0, 1.0, 1.0, 1.0], [1, 1, 5, 5])
    row = log.batch(0)
    assert row["no_ttt_tokens"] == 2 and row["tokens"] == 4
    assert row["bpb_no_ttt"] == pytest.approx(4.0 / (math.log(2) * 2))


def test_warmup_uses_synthetic_tokens_and_leaves_weights_intact():
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert "val" not in warmup.__code__.co_varnames  # it cannot even see validation data
    warmup(model, cfg, lora=True, base=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_warmup_base_step_is_one_micro_batch_at_the_runners_shape(monkeypatch):
    """The base-weight warm-up ran at (ttt.batch_size, ttt.eval_seq_len): 64 x 2048 = 131,072 tokens of
    forward + backward for pr1855, four times global SGD's largest micro-batch, and at a shape global SGD
    never runs. It is now one micro-batch as the runner takes it: global SGD's 32,768-token chunk is 16
    rows of 2048 (fewer than ttt.global_batch_seqs = 32), one packed row on a varlen model; SGD / Hedge
    TTT take eval.batch_seqs rows of the scoring window."""
    from pgolf.eval.ttt_base import base_step_shape
    from pgolf.presets import get_preset

    assert base_step_shape(get_preset("pr1855")) == (16, 2048)  # one packed row: the forward below
    assert base_step_shape(get_preset("pr430")) == (32, 2048)  # hedge: eval.batch_seqs x 2048
    assert base_step_shape(get_preset("pr1855", ["ttt.global_chunk_tokens=131072"])) == (32, 2048)
    for segmentation in ("rows", "varlen"):
        cfg = tiny_cfg()
        cfg.data.segmentation = segmentation
        model = tiny_model(cfg)
        assert (model.max_doc_len > 0) == (segmentation == "varlen")
        rows, T = base_step_shape(cfg)
        packed = segmentation == "varlen"
        assert _warmup_forwards(model, cfg, monkeypatch) == [((1, rows * T) if packed else (rows, T), True)]


def _warmup_forwards(model, cfg, monkeypatch) -> list[tuple[tuple[int, ...], bool]]:
    """(input shape, whether the base weights train) of every forward `warmup(base=True)` makes."""
    shapes = []
    real = type(model).forward

    def spy(self, x, *a, **k):
        shapes.append((tuple(x.shape), torch.is_grad_enabled() and self.tok_emb.weight.requires_grad))
        return real(self, x, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(type(model), "forward", spy)
        warmup(model, cfg, lora=False, base=True)
    return shapes
