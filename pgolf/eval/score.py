"""Scoring the validation set in tokenizer-true bits per byte.

Every target is scored once with the model's one forward (soft-capped fp32 logits, a log-softmax
over the full vocabulary), its bytes come from the scoring LUTs (or the CaseOps sidecar), and the
float64 sums are all-reduced across ranks: val_bpb = sum(loss) / (ln 2 * sum(bytes)).

Windows (docs/records/record-stack.md §1.5): non-overlapping windows of `seq_len` targets, or sliding windows
with `stride` (each window scores its last `stride` targets, the first window all of them). With
`doc_mask` attention inside a window never crosses a BOS (the records' cu_seqlens at BOS). A model
with packed rows (`data.segmentation = varlen`, `model.max_doc_len > 0`) is scored without stride
as the records' `eval_val`: `batch_seqs` sequences per packed row, cut at BOS and every `seq_len`
tokens from a document's start, each rank a contiguous range of whole rows; the tail that does not
fill a whole row on a rank is left out (`packed_plan`). Every score passes through an `EvalStream`
(pgolf.eval.trace), which can keep the per-token trace.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import PgolfError
from pgolf.eval.trace import EvalStream, find_docs
from pgolf.model.gpt import GPT


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def doc_masking(model: GPT, on: bool) -> Iterator[None]:
    """Switch the model's own BOS segmentation on for a while (attention never crosses a BOS)."""
    cfg = model.cfg
    before = cfg.doc_mask
    cfg.doc_mask = before or on
    try:
        yield
    finally:
        cfg.doc_mask = before


@contextlib.contextmanager
def doc_len_cut(model: GPT, max_doc_len: int) -> Iterator[None]:
    """Cut packed rows every `max_doc_len` tokens from a document's start for a while (the records cut
    at eval_seq_len when scoring and in global SGD, at train_seq_len in training)."""
    before = model.max_doc_len
    model.max_doc_len = max_doc_len
    try:
        yield
    finally:
        model.max_doc_len = before


@contextlib.contextmanager
def global_sgd_attention(model: GPT, seq_len: int) -> Iterator[bool]:
    """Global SGD's attention (phased TTT) for a while: never across a BOS
    (GLOBAL_TTT_RESPECT_DOC_BOUNDARIES=1) and, on a packed-rows model (`max_doc_len` > 0: varlen), each
    micro-batch one packed row cut every `seq_len` tokens. Yields whether the rows are packed."""
    packed = int(getattr(model, "max_doc_len", 0)) > 0  # a pgolf GPT: packed rows (varlen) when > 0
    with doc_masking(model, True), doc_len_cut(model, seq_len if packed else 0):
        yield packed


def packed_plan(num_targets: int, seq_len: int, row_seqs: int, rank: int = 0,
                world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, e, s) of rank `rank`'s packed rows of `row_seqs` sequences (record `eval_val`).

    The `num_targets // seq_len` sequences are split into contiguous per-rank ranges; each range is
    cut down to whole rows (the records' "TODO: Don't truncate this"). Every row scores all its targets.
    """
    total = num_targets // seq_len
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    hi = lo + (hi - lo) // row_seqs * row_seqs
    a = np.arange(lo, hi, row_seqs, dtype=np.int64) * seq_len
    return a, a + row_seqs * seq_len, a.copy()


def packed_dropped(num_targets: int, seq_len: int, row_seqs: int, world_size: int) -> np.ndarray:
    """Target positions that no rank's packed rows score (the same on every rank)."""
    covered = np.zeros(num_targets, bool)
    for r in range(world_size):
        a, e, _ = packed_plan(num_targets, seq_len, row_seqs, r, world_size)
        if a.size:
            covered[a[0]:e[-1]] = True
    return np.flatnonzero(~covered)


def window_plan(num_targets: int, seq_len: int, stride: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, e, s) per window: inputs tokens[a:e], targets [a, e), scored targets [s, e).

    Window j ends at e_j = min(seq_len + j * stride, N) (stride 0: non-overlapping windows) and
    scores the targets after the previous window's end, so every target is scored exactly once.
    """
    step = stride if 0 < stride < seq_len else seq_len
    ends = np.arange(seq_len, max(num_targets, seq_len) + step, step, dtype=np.int64)
    ends = np.unique(np.minimum(ends, num_targets))
    ends = ends[ends > 0]
    starts = np.maximum(ends - seq_len, 0)
    scored = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return starts, ends, scored


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The neural distribution: log-softmax of the soft-capped logits over the full vocabulary."""
    return F.log_softmax(logits.float(), dim=-1)


def score_windows(model: GPT, tokens: torch.Tensor, nbytes: torch.Tensor, windows, stream: EvalStream,
                  *, batch_seqs: int, vocab_size: int, distribution=None, after_batch=None) -> None:
    """Score the targets [s, e) of the windows (a, e, s) in order, in batches of `batch_seqs`.

    `distribution(logits (B, K, V), positions (B, K))` -> log-probs (default: the model's softmax; a
    mixer replaces it); `after_batch(pos, y, nll, valid)` is called after each batch was recorded (the place
    for updates that use only scored tokens).
    """
    device = next(model.parameters()).device
    a_all, e_all, s_all = windows
    for i in range(0, len(a_all), batch_seqs):
        a, e, s = a_all[i:i + batch_seqs], e_all[i:i + batch_seqs], s_all[i:i + batch_seqs]
        W = int((e - a).max())
        cols = np.arange(W)
        src = a[:, None] + cols  # (B, W) input positions
        inside = cols < (e - a)[:, None]
        src = np.where(inside, src, 0)
        x = tokens[torch.from_numpy(src)].masked_fill(~torch.from_numpy(inside), 0)  # (B, W)
        y = tokens[torch.from_numpy(src + 1)]  # (B, W) targets (garbage where padded; never scored)
        n = e - s  # scored targets per window
        K = int(n.max())
        kcols = np.arange(K)
        valid = kcols < n[:, None]  # (B, K)
        gi = np.where(valid, (s - a)[:, None] + kcols, 0)  # row offsets of the scored targets
        gi_t = torch.from_numpy(gi).to(device)
        with torch.no_grad(), autocast_for(device):
            z = model.forward_at(x.to(device), gi_t)  # (B, K, V): the scored positions only
        yk = y.to(device).gather(1, gi_t)  # (B, K)
        pos_grid = np.where(valid, s[:, None] + kcols, 0)  # (B, K) target positions
        logp = log_probs(z) if distribution is None else distribution(z, pos_grid)
        nll = stream.score(logp, yk, vocab_size)  # (B, K)
        pos = pos_grid[valid]
        valid_t = torch.from_numpy(valid).to(device)
        stream.record(pos, None, nll[valid_t], nbytes[torch.from_numpy(pos)])
        if after_batch is not None:
            after_batch(pos, yk[valid_t], nll[valid_t], valid)


def score_stream(model: GPT, val: Any, seq_len: int, stride: int = 0, batch_seqs: int = 32, *,
                 rank: int = 0, world_size: int = 1, doc_mask: bool = False,
                 stream: EvalStream | None = None, bos_id: int | None = None) -> dict[str, Any]:
    """Score the whole validation set (rank r takes a contiguous share of the windows)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n = val.tokens.numel() - 1
    if stream is None:
        bos = getattr(model, "bos_id", 1) if bos_id is None else bos_id
        stream = EvalStream(n, docs=find_docs(val.tokens, bos))
    packed = getattr(model, "max_doc_len", 0) > 0 and not 0 < stride < seq_len
    if packed:  # one packed row of batch_seqs sequences per forward
        mine: tuple[np.ndarray, ...] = packed_plan(n, seq_len, batch_seqs, rank, world_size)
        dropped = packed_dropped(n, seq_len, batch_seqs, world_size)
        if dropped.size == n:
            raise PgolfError(f"validation: {n // seq_len} sequences of {seq_len} over {world_size} rank(s) fill no "
                             f"packed row of {batch_seqs} sequences (lower eval.batch_seqs / train.val_batch_tokens)")
        stream.exclude(dropped)
        cut: contextlib.AbstractContextManager = doc_len_cut(model, seq_len)
    else:
        windows = window_plan(n, seq_len, stride)
        lo, hi = len(windows[0]) * rank // world_size, len(windows[0]) * (rank + 1) // world_size
        mine = tuple(w[lo:hi] for w in windows)
        cut = contextlib.nullcontext()
    was_training = model.training
    model.eval()
    with doc_masking(model, doc_mask), cut:
        score_windows(model, val.tokens, val.bytes, mine, stream, batch_seqs=1 if packed else batch_seqs,
                      vocab_size=model.cfg.vocab_size)
    model.train(was_training)
    out = stream.metrics(device)
    out["seconds"] = time.perf_counter() - t0
    return out


def evaluate(model: GPT, val: Any, seq_len: int, batch_seqs: int = 32, *,
             rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Non-overlapping windows of `seq_len` targets (or packed rows); rank r takes a contiguous share."""
    return score_stream(model, val, seq_len, 0, batch_seqs, rank=rank, world_size=world_size)
