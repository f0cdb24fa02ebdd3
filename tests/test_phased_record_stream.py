"""Global SGD of phased TTT as record #1855 runs it (`ttt.global_procedure = record`, docs/fidelity.md
procedure 18), and the TTT queue's tie rule.

The record's rules are written out here on purpose, as small transcriptions of its code (`_find_docs`,
`_build_ttt_global_batches`, the phase's `torch.cat` of the selected documents,
`train_val_ttt_global_sgd_distributed`, `_build_cu_seqlens`), and pgolf is held to them: the token
stream, the rows each step trains on every rank, the number of steps, the lr of each step, the
segments of each packed row, the weights after a phase. The default (`packed`) is pinned to the values
it gave before the record procedure was added.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pgolf.data.segments import boundaries
from pgolf.errors import LegalityError
from pgolf.eval.bpb import ValSet
from pgolf.eval.phased import PhasedTTT, global_sgd, pack_docs, record_stream
from pgolf.eval.score import global_sgd_attention
from pgolf.eval.trace import EvalStream, find_docs
from pgolf.eval.ttt_base import doc_batches
from test_eval_common import BOS, one_thread, stream_for, tiny_cfg, tiny_model, tiny_val  # noqa: F401


# ---------------------------------------------------------------- the record's rules, transcribed

def rec_find_docs(tokens: np.ndarray) -> list[tuple[int, int]]:
    """record `_find_docs`: (start, length), each document through the next BOS inclusive, the last to the end."""
    bos = np.flatnonzero(tokens == BOS)
    docs = []
    for i, start in enumerate(bos):
        end = int(bos[i + 1]) + 1 if i + 1 < len(bos) else tokens.size
        docs.append((int(start), end - int(start)))
    return docs


def rec_batches(docs: list[tuple[int, int]], batch_size: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """record `_build_ttt_global_batches` (ascending=False): (original batch index, [(doc index, (start, len))])."""
    entries = sorted(enumerate(docs), key=lambda x: x[1][1])
    batches = [entries[i:i + batch_size] for i in range(0, len(entries), batch_size)]
    indexed = list(enumerate(batches))
    indexed.sort(key=lambda ib: -max(dl for _, (_, dl) in ib[1]))
    return indexed


def rec_phase_docs(queue, scored_batches: int, boundary: int) -> list[int]:
    """record `eval_val_ttt_phased`: the scored documents sorted by (batch index, position), cut to `boundary`."""
    scored = [(b, pos, d) for b, entries in queue[:scored_batches] for pos, (d, _) in enumerate(entries)]
    return [d for _, _, d in sorted(scored)[:boundary]]


def rec_plan(n_tokens: int, chunk: int, seq_len: int, batch_seqs: int, epochs: int, lr: float, rank: int,
             world: int) -> list[tuple[int, int, float]]:
    """record `train_val_ttt_global_sgd_distributed` on a stream of `n_tokens` tokens: (start_tok, end_tok,
    lr) of every optimizer step on `rank` (the micro-batch is stream[start_tok:end_tok])."""
    total = n_tokens - 1
    num_chunks = (total + chunk - 1) // chunk
    steps = []
    for ci in range(num_chunks):
        chunk_start, chunk_end = ci * chunk, min((ci + 1) * chunk, total)
        if ci == num_chunks - 1 or epochs <= 0:
            continue
        chunk_seqs = (chunk_end - chunk_start) // seq_len
        if chunk_seqs <= 0:
            continue
        lr_now = lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
        my_s, my_e = chunk_seqs * rank // world, chunk_seqs * (rank + 1) // world
        for _ in range(epochs):
            for bs in range(0, my_e - my_s, batch_seqs):
                be = min(bs + batch_seqs, my_e - my_s)
                start_tok, end_tok = chunk_start + (my_s + bs) * seq_len, chunk_start + (my_s + be) * seq_len + 1
                if end_tok <= n_tokens:
                    steps.append((start_tok, end_tok, lr_now))
    return steps


def rec_cu_boundaries(x: np.ndarray, max_doc_len: int) -> list[int]:
    """record `_build_cu_seqlens(bos positions of x, len(x), max_doc_len)`, without the bucket padding."""
    bos_pos = np.flatnonzero(x == BOS).tolist()
    if not bos_pos or bos_pos[0] != 0:
        bos_pos = [0] + bos_pos
    seg_starts = []
    ends = bos_pos + [x.size]
    for start, end in zip(ends[:-1], ends[1:]):
        seg_starts.extend(range(start, end, max_doc_len) if max_doc_len > 0 else [start])
    return seg_starts + [x.size]


# ---------------------------------------------------------------- helpers

def _val_of(parts: list[list[int]]) -> ValSet:
    t = torch.tensor([tok for p in parts for tok in p], dtype=torch.int64)
    return ValSet(tokens=t, bytes=torch.ones(t.numel() - 1, dtype=torch.int16),
                  doc_starts=torch.nonzero(t == BOS).flatten(), byte_source="lut")


def _lengths_val(lengths: list[int]) -> ValSet:
    """Documents of the given lengths (targets); the last one gets the extra token its final target needs."""
    parts = [[BOS] + [2 + (7 * i + j) % 60 for j in range(n - 1)] for i, n in enumerate(lengths)]
    parts[-1].append(3)
    return _val_of(parts)


def _cfg(procedure: str = "record", **ttt):
    cfg = tiny_cfg()
    cfg.model.doc_mask, cfg.data.segmentation = True, "varlen"
    cfg.ttt.global_procedure = procedure
    for k, v in ttt.items():
        setattr(cfg.ttt, k, v)
    return cfg


def _scored(n: int) -> EvalStream:
    stream = EvalStream(n)
    stream.record(np.arange(n), None, np.zeros(n), np.ones(n))
    return stream


def _spy(monkeypatch, model, stream):
    """What each optimizer step saw: the rows of its forward (with the model's segment cut), its lr, and
    the positions declared to the ledger."""
    seen: dict[str, list] = {"rows": [], "lr": [], "declared": [], "cuts": []}
    step = torch.optim.SGD.step

    def spy_step(self, *a, **k):
        seen["lr"].append(self.param_groups[0]["lr"])
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", spy_step)
    declare = stream.declare_update
    monkeypatch.setattr(stream, "declare_update", lambda p: (seen["declared"].append(np.asarray(p).tolist()),
                                                             declare(p))[1])

    def on_forward(m, args):
        seen["rows"].append((len(seen["lr"]), args[0].cpu().numpy().copy(), args[1].cpu().numpy().copy()))
        seen["cuts"].append((m.bos_id, m.max_doc_len))
    model.register_forward_pre_hook(on_forward)
    return seen


# ---------------------------------------------------------------- the stream and the steps, by hand

# three documents of 5, 4 and 6 targets: BOS at 0, 5 and 9, 16 tokens (15 targets)
HAND = [[BOS, 10, 11, 12, 13], [BOS, 20, 21, 22], [BOS, 30, 31, 32, 33, 34, 35]]


def test_record_stream_by_hand():
    """Documents 2, 0, 1 in that order. The record takes tokens[9:16] (the last document runs to the end),
    tokens[0:6] and tokens[5:10] (each through the next BOS), so two junction pairs appear: (35 -> BOS)
    and (BOS -> BOS). Their positions are -1; every other pair is the document's own target position."""
    val = _val_of(HAND)
    t = val.tokens.numpy()
    docs = find_docs(val.tokens, BOS)
    assert docs.lengths.tolist() == [5, 4, 6]
    assert [n for _, n in rec_find_docs(t)] == [6, 5, 7]  # the record's lengths: pgolf's + 1, the last too
    sel = np.array([2, 0, 1])
    x, y, pos = record_stream(t, docs.starts[sel], docs.ends[sel], BOS)
    stream = [1, 30, 31, 32, 33, 34, 35, 1, 10, 11, 12, 13, 1, 1, 20, 21, 22, 1]
    ref = np.concatenate([t[s:s + n] for s, n in (rec_find_docs(t)[d] for d in sel)])
    assert ref.tolist() == stream
    assert x.tolist() == stream[:-1] and y.tolist() == stream[1:]
    assert pos.tolist() == [9, 10, 11, 12, 13, 14, -1, 0, 1, 2, 3, 4, -1, 5, 6, 7, 8]
    own = pos >= 0  # the documents' own pairs are exactly pgolf's packing of them
    px, py, ppos = pack_docs(t, docs.starts[sel], docs.ends[sel])
    assert (x[own] == px).all() and (y[own] == py).all() and (pos[own] == ppos).all()


def test_record_stream_refuses_a_junction_onto_a_prefix_document():
    """A stream that does not open with a BOS has a prefix document (pgolf's find_docs; the record has none).
    Its first token is no target of anything, so never scored: a junction onto it would train on it."""
    t = np.array([7, 8, BOS, 10, 11, BOS, 20, 21], dtype=np.int64)
    docs = find_docs(t, BOS)
    assert docs.starts.tolist() == [0, 2, 5]
    record_stream(t, docs.starts[[0, 1]], docs.ends[[0, 1]], BOS)  # the prefix first: no junction onto it
    with pytest.raises(LegalityError, match="junction"):
        record_stream(t, docs.starts[[1, 0]], docs.ends[[1, 0]], BOS)



@pytest.mark.parametrize("world", [1, 2])
def test_record_steps_by_hand(world, monkeypatch):
    """The stream above (17 pairs), chunks of 8, sequences of 4, micro-batches of 1 sequence: 3 chunks, the
    last (pair 16) skipped; chunk c trains pairs [8c, 8c + 8) at lr 0.01 (1 + cos(pi c / 2)) / 2.
    One rank: 4 steps, rows [0,4) [4,8) | [8,12) [12,16). Two ranks: a step per chunk, rank 0 the first
    sequence, rank 1 the second; the ledger hears both ranks' positions (the junctions left out)."""
    val = _val_of(HAND)
    t = val.tokens.numpy()
    docs = find_docs(val.tokens, BOS)
    sel = np.array([2, 0, 1])
    x, y, pos = record_stream(t, docs.starts[sel], docs.ends[sel], BOS)
    cfg = _cfg(global_chunk_tokens=8, global_batch_seqs=1, global_lr=0.01)
    x0, x1, x2, x3 = [1, 30, 31, 32], [33, 34, 35, 1], [10, 11, 12, 13], [1, 1, 20, 21]  # inputs of [4s, 4s + 4)
    y0, y1, y2, y3 = [30, 31, 32, 33], [34, 35, 1, 10], [11, 12, 13, 1], [1, 20, 21, 22]
    rows = {1: {0: [(x0, y0), (x1, y1), (x2, y2), (x3, y3)]},
            2: {0: [(x0, y0), (x2, y2)], 1: [(x1, y1), (x3, y3)]}}[world]
    declared = {1: [[9, 10, 11, 12], [13, 14, 0], [1, 2, 3, 4], [5, 6, 7]],
                2: [[9, 10, 11, 12, 13, 14, 0], [1, 2, 3, 4, 5, 6, 7]]}[world]
    for rank in range(world):
        model, stream = tiny_model(cfg), _scored(val.num_targets)
        seen = _spy(monkeypatch, model, stream)
        steps = global_sgd(model, x, y, pos, cfg.ttt, stream, seq_len=4, rank=rank, world_size=world)
        assert steps == len(rows[rank]) == len(seen["lr"])
        assert seen["lr"] == pytest.approx([0.01] * (steps // 2) + [0.005] * (steps // 2), rel=1e-12)
        assert [[int(s)] for s, _, _ in seen["rows"]] == [[i] for i in range(steps)]  # one forward per step
        assert [(xb.tolist()[0], yb.tolist()[0]) for _, xb, yb in seen["rows"]] == rows[rank]
        assert seen["declared"] == declared


# ---------------------------------------------------------------- against the transcription

CASES = [  # chunk tokens, seq_len, batch_seqs, epochs, world: the record's ranks take equal step counts
    (32, 8, 2, 1, 1), (48, 8, 1, 2, 1), (48, 8, 2, 1, 2), (64, 16, 1, 1, 4), (72, 8, 3, 2, 3),
]


@pytest.mark.parametrize("chunk,seq_len,batch_seqs,epochs,world", CASES)
def test_record_steps_follow_the_transcription(chunk, seq_len, batch_seqs, epochs, world, monkeypatch):
    """Documents of tiny_val in the record's phase order (shortest scored first); on every rank, pgolf's
    steps are the transcription's: the same count, the same rows (x = stream[a:b-1], y = stream[a+1:b]),
    the same lr, and each packed row cut into the segments of the record's `_build_cu_seqlens`."""
    val = tiny_val(14)
    t = val.tokens.numpy()
    rdocs = rec_find_docs(t)
    docs = find_docs(val.tokens, BOS)
    assert [n for _, n in rdocs] == (docs.lengths + 1).tolist()  # one offset for all: the same length order
    queue = rec_batches(rdocs, 3)
    sel = np.array(rec_phase_docs(queue, 3, 8))
    rstream = np.concatenate([t[s:s + n] for s, n in (rdocs[d] for d in sel)])
    x, y, pos = record_stream(t, docs.starts[sel], docs.ends[sel], BOS)
    assert x.tolist() == rstream[:-1].tolist() and y.tolist() == rstream[1:].tolist()
    cfg = _cfg(global_chunk_tokens=chunk, global_batch_seqs=batch_seqs, global_epochs=epochs, global_lr=0.01)
    plans = [rec_plan(rstream.size, chunk, seq_len, batch_seqs, epochs, 0.01, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) > 1  # a case the record runs (no rank waits)
    for rank, plan in enumerate(plans):
        model, stream = tiny_model(cfg), _scored(val.num_targets)
        seen = _spy(monkeypatch, model, stream)
        steps = global_sgd(model, x, y, pos, cfg.ttt, stream, seq_len=seq_len, rank=rank, world_size=world)
        assert steps == len(plan) and seen["lr"] == pytest.approx([lr for _, _, lr in plan], rel=1e-12)
        assert [s for s, _, _ in seen["rows"]] == list(range(steps))
        for (_, xb, yb), (a, b, _) in zip(seen["rows"], plan):
            assert xb.tolist() == [rstream[a:b - 1].tolist()] and yb.tolist() == [rstream[a + 1:b].tolist()]
        for (_, xb, _), (bos_id, cut) in zip(seen["rows"], seen["cuts"]):
            assert (bos_id, cut) == (BOS, seq_len)
            assert boundaries(xb[0], bos_id, cut).tolist() == rec_cu_boundaries(xb[0], seq_len)
        trained = {p for d in seen["declared"] for p in d}
        assert trained <= set(np.flatnonzero(np.isin(docs.of(np.arange(val.num_targets)), sel)).tolist())


def test_segments_of_rows_without_a_bos_and_starting_mid_document():
    """The cut pgolf's packed rows get (pgolf.data.segments) is the record's `_build_cu_seqlens` on rows
    that start inside a document, hold no BOS, a BOS last, BOS BOS (a junction), or run past max_doc_len."""
    rows = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 6, BOS, 7, 8, 9, 10, 11, 12, BOS], [BOS, BOS, 4, 5],
            [7, BOS, BOS, 3, 4, 5, 6, 7, 8, 9, 10], [BOS, 2, 3], [2]]
    for row in rows:
        for cut in (0, 1, 3, 4):
            a = np.array(row)
            assert boundaries(a, BOS, cut).tolist() == rec_cu_boundaries(a, cut), (row, cut)


# ---------------------------------------------------------------- the weights after a phase

def test_record_phase_weights_equal_a_reference_loop():
    """One phase of PhasedTTT (record procedure, `shortest`) against the record's loop written here: the
    documents by the record's rules, its stream, its chunks and micro-batches, SGD with momentum, the mean
    loss of each micro-batch, clip, step (fp32, one rank)."""
    cfg = _cfg(global_chunk_tokens=48, global_batch_seqs=2, global_epochs=2, global_lr=0.02, eval_seq_len=8,
               batch_size=3, prefix_docs=7, phases=1, phase_select="shortest", global_grad_clip=100.0)  # not hit:
    # the clip would hide a loss of the wrong scale
    tc = cfg.ttt
    model, val = tiny_model(cfg), tiny_val(14)
    r = PhasedTTT(model, val, cfg, _scored(val.num_targets))
    r.global_phase(0)
    # the reference: the scored batches (pgolf fires after the batch that crosses the boundary)
    t = val.tokens.numpy()
    rdocs = rec_find_docs(t)
    sel = rec_phase_docs(rec_batches(rdocs, tc.batch_size), r.fired_after[0] + 1, tc.prefix_docs)
    assert sel == r.phase_docs(0).tolist()
    rstream = torch.from_numpy(np.concatenate([t[s:s + n] for s, n in (rdocs[d] for d in sel)]))
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=tc.global_lr, momentum=tc.global_momentum)
    ref.train()
    n_steps = 0
    with global_sgd_attention(ref, tc.eval_seq_len):
        for start, end, lr in rec_plan(rstream.numel(), tc.global_chunk_tokens, tc.eval_seq_len,
                                       tc.global_batch_seqs, tc.global_epochs, tc.global_lr, 0, 1):
            for g in opt.param_groups:
                g["lr"] = lr
            local = rstream[start:end]
            opt.zero_grad(set_to_none=True)
            ref(local[:-1][None], local[1:][None]).backward()
            torch.nn.utils.clip_grad_norm_(params, tc.global_grad_clip)
            opt.step()
            n_steps += 1
    assert n_steps >= 4
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(r.model.parameters(), params))
    moved = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(model.parameters(), params))
    assert diff <= 1e-6 and moved > 1e-3, (diff, moved)


def test_record_procedure_passes_the_strict_ledger_which_still_catches_an_early_phase():
    """Phased TTT end to end with the record procedure and a strict ledger: every position a phase declares
    was scored (the junction pairs, which no validation position holds, are not declared). A phase that
    also trains on the next batch's documents, not yet scored, is still refused."""
    from pgolf.errors import LegalityError

    class Early(PhasedTTT):
        def phase_docs(self, k):
            b = next(b for b, ks in self.fire.items() if k in ks)
            return np.concatenate([self.batches[b + 1], super().phase_docs(k)])

    cfg = _cfg(phases=2, phase_select="shortest")
    model, val = tiny_model(cfg), tiny_val()
    stream = stream_for(val)
    out = PhasedTTT(model, val, cfg, stream).run()
    assert out["updates"] > 0 and stream.step > 0 and not stream.violations
    with pytest.raises(LegalityError, match="score before update"):
        Early(model, val, cfg, stream_for(val)).run()


# ---------------------------------------------------------------- ranks with unequal micro-batch counts

def test_unequal_shares_take_the_same_number_of_steps(monkeypatch):
    """3 sequences per chunk on 2 ranks, micro-batches of 1: rank 0 holds 1, rank 1 holds 2. The record's
    rank 0 would stop after one step and rank 1 wait at the second all-reduce forever; in pgolf both take
    2 steps per chunk, rank 0's second without a forward (a zero gradient)."""
    val = tiny_val(8)
    t = val.tokens.numpy()
    docs = find_docs(val.tokens, BOS)
    x, y, pos = record_stream(t, docs.starts, docs.ends, BOS)
    cfg = _cfg(global_chunk_tokens=24, global_batch_seqs=1)
    chunks = -(-x.size // 24) - 1
    forwards = {}
    for rank in range(2):
        model, stream = tiny_model(cfg), _scored(val.num_targets)
        seen = _spy(monkeypatch, model, stream)
        assert global_sgd(model, x, y, pos, cfg.ttt, stream, seq_len=8, rank=rank, world_size=2) == 2 * chunks
        forwards[rank] = [s for s, _, _ in seen["rows"]]
    assert forwards == {0: list(range(0, 2 * chunks, 2)), 1: list(range(2 * chunks))}


@pytest.mark.parametrize("clip", [100.0, 0.05])
def test_unequal_shares_on_two_ranks_average_with_a_zero_gradient(clip, monkeypatch):
    """The case above on two ranks (threads joined by an all-reduce that sums at a barrier, as a process
    group would; a rank that stopped early would leave the other waiting there): both end equal, and
    equal to the record's average written out: per chunk (g(seq 0) + g(seq 1)) / 2, then (0 + g(seq 2)) / 2,
    each clipped after the average (a clip not hit, then one hit at every step)."""
    import threading

    import pgolf.distributed

    val = tiny_val(8)
    docs = find_docs(val.tokens, BOS)
    x, y, pos = record_stream(val.tokens.numpy(), docs.starts, docs.ends, BOS)
    cfg = _cfg(global_chunk_tokens=24, global_batch_seqs=1, global_lr=0.05, global_grad_clip=clip)
    models, streams = [tiny_model(cfg) for _ in range(2)], [_scored(val.num_targets) for _ in range(2)]
    barrier, box, errors = threading.Barrier(2, timeout=20), {}, []

    def all_reduce_sum_(tensors):
        box[threading.current_thread().name] = [t.clone() for t in tensors]
        barrier.wait()
        total = [a + b for a, b in zip(box["0"], box["1"])]
        barrier.wait()
        for t, s in zip(tensors, total):
            t.copy_(s)

    def rank(r):
        try:
            global_sgd(models[r], x, y, pos, cfg.ttt, streams[r], seq_len=8, rank=r, world_size=2)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)
            barrier.abort()
    monkeypatch.setattr(pgolf.distributed, "all_reduce_sum_", all_reduce_sum_)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    threads = [threading.Thread(target=rank, args=(r,), name=str(r)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert not errors, errors
    ref = tiny_model(cfg)
    params = list(ref.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.05, momentum=cfg.ttt.global_momentum)
    ref.train()
    n_chunks, norms = -(-x.size // 24), []
    with global_sgd_attention(ref, 8):
        for c in range(n_chunks - 1):
            for g in opt.param_groups:
                g["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * c / (n_chunks - 1)))
            for seqs in ([0, 1], [2]):
                opt.zero_grad(set_to_none=True)
                for s in seqs:
                    a = 24 * c + 8 * s
                    xb, yb = torch.from_numpy(x[a:a + 8])[None], torch.from_numpy(y[a:a + 8])[None]
                    (ref(xb, yb) / 2).backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
                opt.step()
    assert (min(norms) > clip) == (clip < 1) and (max(norms) < clip) == (clip > 1)
    for m in models:
        diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(m.parameters(), params))
        assert diff <= 1e-6, diff


# ---------------------------------------------------------------- the queue's ties

def test_queue_ties_keep_ascending_batch_order():
    """Lengths 3 5 5 5 2 5 in batches of 2: ascending d4(2) d0(3) | d1 d2 (5, 5) | d3 d5 (5, 5) = A0 A1 A2.
    A1 and A2 tie at 5: the record's stable sort by -max keeps A1 first (pgolf reversed: A2 first)."""
    val = _lengths_val([3, 5, 5, 5, 2, 5])
    docs = find_docs(val.tokens, BOS)
    assert [b.tolist() for b in doc_batches(docs, 2)] == [[1, 2], [3, 5], [4, 0]]
    g = np.random.default_rng(0)
    for bs in (1, 2, 3, 5):
        lengths = g.integers(1, 5, size=23).tolist()  # many ties
        tokens = _lengths_val(lengths).tokens
        docs = find_docs(tokens, BOS)
        want = [[d for d, _ in entries] for _, entries in rec_batches(rec_find_docs(tokens.numpy()), bs)]
        assert [b.tolist() for b in doc_batches(docs, bs)] == want, (bs, lengths)


@pytest.mark.parametrize("phases", [1, 3])
def test_shortest_phase_documents_with_ties_follow_the_record(phases):
    """`shortest` with tied batches: each phase's documents are the record's (batch index, position) order
    of the scored batches, cut to its boundary."""
    lengths = [4, 2, 4, 3, 4, 2, 4, 4, 3, 2, 4, 4, 1]
    cfg = _cfg(batch_size=2, prefix_docs=9, phases=phases, phase_select="shortest")
    val = _lengths_val(lengths)
    r = PhasedTTT(tiny_model(cfg), val, cfg, stream_for(val))
    queue = rec_batches(rec_find_docs(val.tokens.numpy()), 2)
    assert [b.tolist() for b in r.batches] == [[d for d, _ in e] for _, e in queue]
    for k in range(phases):
        assert r.phase_docs(k).tolist() == rec_phase_docs(queue, r.fired_after[k] + 1, r.bounds[k])


# ---------------------------------------------------------------- the default, unchanged

@pytest.mark.parametrize("varlen,epochs,steps,total,absolute", [
    (False, 2, 6, -0.04571364774892572, 4.201268351680483),
    (True, 1, 3, -0.010566104133431509, 1.3284095755507224),
])
def test_packed_procedure_is_pinned(varlen, epochs, steps, total, absolute):
    """`packed` (the default) as it trained before the record procedure was added: 6 documents, 125 pairs,
    chunks of 40 (3 trained, each 2 rows of 16 and a short tail of 8), micro-batches of 1 row; the sum and
    absolute sum of the weight change, computed with the code of before."""
    cfg = tiny_cfg()
    if varlen:
        cfg.model.doc_mask, cfg.data.segmentation = True, "varlen"
    assert cfg.ttt.global_procedure == "packed"
    cfg.ttt.global_chunk_tokens, cfg.ttt.global_batch_seqs, cfg.ttt.global_epochs = 40, 1, epochs
    model, val = tiny_model(cfg), tiny_val(12)
    docs = find_docs(val.tokens, BOS)
    sel = np.array([3, 0, 5, 1, 7, 9])
    x, y, pos = pack_docs(val.tokens.numpy(), docs.starts[sel], docs.ends[sel])
    before = [p.detach().clone() for p in model.parameters()]
    assert global_sgd(model, x, y, pos, cfg.ttt, _scored(val.num_targets), seq_len=16) == steps
    delta = torch.cat([(p.detach() - b).flatten().double() for p, b in zip(model.parameters(), before)])
    assert x.size == 125 and delta.sum().item() == pytest.approx(total, rel=1e-5)
    assert delta.abs().sum().item() == pytest.approx(absolute, rel=1e-5)


def test_unknown_global_procedure_is_named():
    from pgolf.errors import PgolfError

    cfg = _cfg("stream", phases=1)
    val = tiny_val(6)
    with pytest.raises(PgolfError, match="ttt.global_procedure"):
        PhasedTTT(tiny_model(cfg), val, cfg, stream_for(val))
