"""Segmentation (issue 17): one rule for where segments start (record `_build_cu_seqlens`, docs/records/record-stack.md
§1.5), the packed training rows, per-segment attention, and validation packed as the records' eval_val."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_helpers import one_thread  # noqa: F401  (autouse)
from model_helpers import BOS, V, max_diff, tiny_model
from pgolf.data import shards
from pgolf.data.loader import TrainLoader
from pgolf.data.segments import boundaries, segment_ids
from pgolf.errors import LegalityError
from pgolf.model.attention import attend, prepare_doc_mask

B_ = BOS  # short name for the hand-worked streams below

# (stream, max_doc_len, expected starts + end), each worked out by hand
HAND = [
    # a document (BOS at 3) crossing the row boundary at 4: cut 4 tokens after ITS start (7), not at 4
    ([B_, 5, 5, B_, 6, 6, 6, 6, 6, 6, B_, 7], 4, [0, 3, 7, 10, 12]),
    # one document longer than 2 x max_doc_len: 0, 4, 8, then the end
    ([B_] + [3] * 10, 4, [0, 4, 8, 11]),
    # a 1-token document (BOS followed by BOS)
    ([B_, B_, 4, 4], 4, [0, 1, 4]),
    # the stream starts mid-document: the prefix counts from the row start
    ([2, 2, 2, 2, 2, B_, 3, 3], 3, [0, 3, 5, 8]),
    # BOS as the last token: its own 1-token segment
    ([B_, 2, 2, B_], 0, [0, 3, 4]),
    ([B_, 2, 2, B_], 2, [0, 2, 3, 4]),
    # no length cut: segments at the start and every BOS only
    ([B_] + [3] * 10 + [B_, 4], 0, [0, 11, 13]),
]


@pytest.mark.parametrize("stream,max_doc_len,expected", HAND)
def test_boundaries_hand_worked(stream, max_doc_len, expected):
    got = boundaries(np.array(stream, np.uint16), BOS, max_doc_len)
    assert got.dtype == np.int64 and got.tolist() == expected
    t = boundaries(torch.tensor(stream), BOS, max_doc_len)  # the torch form gives the same
    assert t.dtype == torch.int64 and t.tolist() == expected


def _loop_reference(stream: list[int], max_doc_len: int) -> list[int]:
    """Segment starts walked token by token: a new segment at 0, at a BOS, or after max_doc_len tokens
    of the current document."""
    out, doc_start = [], 0
    for i, tok in enumerate(stream):
        if i == 0 or tok == BOS:
            doc_start = i
        if i == doc_start or (max_doc_len and (i - doc_start) % max_doc_len == 0):
            out.append(i)
    return out + [len(stream)]


def test_boundaries_equal_a_token_by_token_walk():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 120))
        stream = np.where(rng.random(n) < 0.08, BOS, rng.integers(2, V, n)).tolist()
        for L in (0, 1, 3, 16):
            assert boundaries(np.array(stream), BOS, L).tolist() == _loop_reference(stream, L), (trial, L)


# ---------------------------------------------------------------- attention per segment

def _reference(q, k, v, ids):
    """float64 softmax attention, causal and inside equal segment ids; query head h reads KV head h // g."""
    T, H, D = q.shape[1:]
    g = H // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    ok = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & (ids[:, :, None] == ids[:, None, :])
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~ok[:, None], float("-inf")).softmax(-1), v)


@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 4)])
def test_packed_sdpa_is_exact_attention_per_segment_with_gradients(H, Hkv):
    """The CPU path of packed rows (one causal call per group of equal-length segments) equals the float64
    reference in value and gradient; rows hold a 1-token segment, length cuts and equal-length groups."""
    idx = torch.randint(2, V, (2, 40), generator=torch.Generator().manual_seed(1))
    idx[0, [0, 5, 6, 30]] = BOS
    idx[1, [12, 13]] = BOS
    ids = segment_ids(idx, BOS, 8)
    mask = prepare_doc_mask(ids, "sdpa", 8)
    assert len(mask.plan.groups) < int(ids.max(1).values.sum())  # equal lengths share a call
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 40, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    y = attend(q, k, v, doc_ids=mask, backend="sdpa")
    ref = _reference(q, k, v, ids)
    assert max_diff(y, ref) < 1e-12
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert max(max_diff(a, b) for a, b in zip(grads, grads_ref)) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa3", "fa2", "flex", "sdpa"])
def test_cuda_packed_row_equals_reference(backend):
    """A 2,048-token packed row with segments cut every 256 tokens, on each CUDA backend, in bf16."""
    from pgolf.model.attention import kernel_available

    assert torch.cuda.is_available(), "run the gpu tests on a CUDA machine"
    if not kernel_available(backend):
        pytest.skip(f"{backend} is not installed on this machine")
    idx = torch.randint(2, V, (1, 2048), generator=torch.Generator().manual_seed(6))
    idx[0, [0, 3, 700, 701, 1500]] = BOS
    ids = segment_ids(idx.cuda(), BOS, 256)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2048, h, 64, generator=g).cuda().bfloat16() for h in (8, 4, 4))
    y = attend(q, k, v, doc_ids=prepare_doc_mask(ids, backend, 256), backend=backend)
    assert y.shape == q.shape and max_diff(y, _reference(q, k, v, ids)) < 2.5e-2


def test_rows_mask_is_bitwise_the_mask_of_before():
    """`rows` keeps its dense SDPA mask: the one the BOS-count ids (the code before issue 17) gave."""
    idx = torch.randint(2, V, (3, 24), generator=torch.Generator().manual_seed(3))
    idx[0, [0, 7]] = BOS
    idx[1, [5, 6, 23]] = BOS
    before = (idx == BOS).cumsum(1, dtype=torch.int32)
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    old = ((before[:, :, None] == before[:, None, :]) & causal)[:, None]
    assert torch.equal(prepare_doc_mask(segment_ids(idx, BOS), "sdpa").plan, old)


def test_flash_cu_seqlens_are_the_boundaries_of_each_row():
    """The varlen kernel's cu_seqlens (computed on the model's device) are `boundaries` row by row."""
    idx = torch.randint(2, V, (2, 20), generator=torch.Generator().manual_seed(4))
    idx[0, [3, 4]] = BOS
    idx[1, [0, 18]] = BOS
    cu, max_len = prepare_doc_mask(segment_ids(idx, BOS, 6), "fa3", 6).plan
    rows = torch.cat([boundaries(idx[r], BOS, 6)[:-1] + 20 * r for r in range(2)] + [torch.tensor([40])])
    assert cu.dtype == torch.int32 and cu[:rows.numel()].tolist() == rows.tolist() and max_len == 6
    assert cu.numel() == 64 and (cu[rows.numel():] == 40).all()  # padded with empty segments, as the records


# ---------------------------------------------------------------- the model on packed rows

def _doc(n: int, seed: int) -> torch.Tensor:
    """A BOS-started document of n tokens."""
    d = torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(seed))
    d[:1] = BOS
    return d


def test_varlen_document_loss_does_not_depend_on_where_it_sits():
    """pr1855 at reduced width, looping on, packed rows cut every 16: a 40-token document (over 2 x 16) has
    the same per-token losses at any offset of the row; fixed rows of 16 cut it at arbitrary points."""
    model = tiny_model("pr1855", "train.train_seq_len=16")
    assert model.max_doc_len == 16 and model.cfg.doc_mask and model.looping
    doc, tail = _doc(40, 1), _doc(45, 2)

    def losses(offset: int, rows: bool) -> torch.Tensor:
        row = torch.cat([_doc(offset, 3), doc, tail])[:81]  # (81,): 80 inputs + the last target
        x, y = row[:-1], row[1:]
        with torch.no_grad():
            if rows:
                model.max_doc_len = 0
                per = model(x.view(-1, 16), y.view(-1, 16), reduction="none").flatten()
                model.max_doc_len = 16
            else:
                per = model(x[None], y[None], reduction="none")[0]
        return per[offset:offset + 39]  # the document's own targets (its next-BOS target excluded)

    base = losses(0, rows=False)
    for off in (5, 21, 37):
        assert max_diff(losses(off, rows=False), base) < 2e-5, off
    assert max(max_diff(losses(off, rows=True), losses(0, rows=True)) for off in (5, 21)) > 1e-2


# ---------------------------------------------------------------- the training loader

def _write(path, shard_tokens):
    for i, toks in enumerate(shard_tokens):
        shards.write_shard(path / f"fineweb_train_{i:06d}.bin", np.array(toks))
    shards.write_shard(path / "fineweb_val_000000.bin", np.arange(2, 40))


def _check_segments(x: torch.Tensor, max_doc_len: int) -> list[tuple[int, int]]:
    """Segments of a packed row as the model cuts it: none crosses a BOS, none exceeds max_doc_len."""
    b = boundaries(x, BOS, max_doc_len).tolist()
    segs = list(zip(b[:-1], b[1:]))
    for s, e in segs:
        assert 0 < e - s <= max_doc_len
        assert not (x[s + 1:e] == BOS).any()  # a BOS only ever opens a segment
    return segs


def test_varlen_loader_rows_are_packed_and_start_at_a_bos(tmp_path):
    # shard 0 (29 tokens) starts inside a document, its first BOS at 2; shard 1's first BOS is at 3
    s0 = [5, 6, BOS, 7, BOS] + [7] * 5 + [BOS, 8, 8, BOS] + [9] * 12 + [BOS, 4, 4]
    s1 = [6, 6, 6, BOS] + [3] * 9 + [BOS, 2, 2, 2]
    _write(tmp_path, [s0, s1])
    loader = TrainLoader(tmp_path, seq_len=4, segmentation="varlen", bos_id=BOS)
    ((x, y),) = loader.next_batch(12)
    assert x.shape == y.shape == (1, 12) and torch.equal(y[0, :-1], x[0, 1:])
    assert x[0].tolist() == s0[2:14]  # from the first BOS, not from token 0
    # the document at 2 runs across position 4 (a fixed row's end) and is cut 4 tokens after ITS start
    assert _check_segments(x[0], 4) == [(0, 2), (2, 6), (6, 8), (8, 11), (11, 12)]
    loader.next_batch(12)  # s0[15:28]; the next 13 tokens do not fit shard 0, so shard 1 opens
    ((x, _),) = loader.next_batch(12)
    assert x[0].tolist() == s1[3:15]  # again from the shard's first BOS
    rows = TrainLoader(tmp_path, seq_len=4)  # rows: unchanged, from token 0 in rows of seq_len
    ((xr, _),) = rows.next_batch(12)
    assert xr.shape == (3, 4) and xr.flatten().tolist() == s0[:12]


def test_varlen_loader_on_real_shards(sp1024_data):
    """On FineWeb shards: every packed row's segments respect BOS and max_doc_len, and some document
    runs across a multiple of seq_len (where fixed rows would have cut it)."""
    loader = TrainLoader(sp1024_data, seq_len=256, segmentation="varlen", bos_id=BOS)
    across = 0
    for _ in range(8):
        for x, _ in loader.next_batch(4096, accum_steps=2):
            assert x.shape == (1, 4096)
            segs = _check_segments(x[0], 256)
            across += sum(s // 256 != (e - 1) // 256 for s, e in segs)
    assert across > 0


# ---------------------------------------------------------------- validation as the records' eval_val

def _record_eval_val_positions(n: int, seq_len: int, row_seqs: int, rank: int, world: int) -> np.ndarray:
    """The targets record eval_val scores on `rank`: a contiguous range of sequences, cut to whole rows."""
    total = n // seq_len
    s0, s1 = total * rank // world, total * (rank + 1) // world
    s1 = s0 + (s1 - s0) // row_seqs * row_seqs
    return np.arange(s0 * seq_len, s1 * seq_len)


def test_packed_scoring_scores_the_record_eval_val_tokens_with_packed_rows():
    from pgolf.eval.score import score_stream
    from test_eval_common import stream_for, tiny_cfg as eval_cfg, tiny_model as eval_model, tiny_val

    cfg = eval_cfg()
    cfg.model.doc_mask, cfg.data.segmentation = True, "varlen"
    model, val = eval_model(cfg), tiny_val(30)
    n, seq, R = val.num_targets, 16, 3
    assert (n // seq) % R and (n // seq // 2) % R  # one rank and each of two ranks drop a tail
    for world in (1, 2):
        streams = [stream_for(val, keep_losses=True, keep_trace=True) for _ in range(world)]
        for r in range(world):
            score_stream(model, val, seq, 0, R, rank=r, world_size=world, stream=streams[r])
            assert np.array_equal(streams[r].trace().position, _record_eval_val_positions(n, seq, R, r, world))
        if world == 1:
            streams[0].finish()  # the dropped tail is left out by design, not missing
            with pytest.raises(LegalityError, match="before it was scored"):
                streams[0].declare_update([n - 1])  # never scored: no update may train on it
    # each row is ONE packed forward of R x seq tokens, cut at BOS and every seq tokens from a document's start
    s = stream_for(val, keep_losses=True)
    score_stream(model, val, seq, 0, R, stream=s)
    a = seq * R
    x, y = val.tokens[a:2 * a][None], val.tokens[a + 1:2 * a + 1][None]
    model.max_doc_len = seq
    with torch.no_grad():
        direct = model(x, y, reduction="none")[0]
    assert max_diff(torch.from_numpy(s.losses[a:2 * a]), direct) < 1e-5
    rows = stream_for(val, keep_losses=True)
    model.max_doc_len = 0
    score_stream(model, val, seq, 0, R, stream=rows)  # fixed rows of seq: different losses
    assert max_diff(torch.from_numpy(rows.losses[a:2 * a]), direct) > 1e-2


def test_packed_validation_rows_follow_the_records_batch():
    """val_batch_tokens / (world x accumulation) tokens per packed row: 32 x 2048 on 1 or 8 ranks (pr1855);
    fixed rows keep val_batch_tokens / world."""
    from pgolf.presets import get_preset
    from pgolf.train import val_batch_seqs

    assert val_batch_seqs(get_preset("pr1855"), 1) == val_batch_seqs(get_preset("pr1855"), 8) == 32
    assert val_batch_seqs(get_preset("baseline"), 1) == 524_288 // 1024
    assert val_batch_seqs(get_preset("baseline"), 8) == 524_288 // 1024 // 8
