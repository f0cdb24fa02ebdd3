"""Where attention segments start: one rule for every place that cuts a token stream.

From PR #1530 on, the records cut each packed row at its start, at every BOS, and every `max_doc_len`
tokens counted from each document's start (record `_build_cu_seqlens`; docs/records/record-stack.md §1.5); a
row that starts inside a document counts that prefix from the row's start. Attention then runs per
segment. The training loader's rows, validation scoring, GPTQ calibration, global-SGD batches and
the attention masks all derive their segments from `segment_starts` here (the model turns it into
cu_seqlens or segment ids on its own device, with static shapes and no host sync).

`max_doc_len` 0 = no length cut: segments at the row start and every BOS only (pgolf's `rows`
segmentation, where a fixed row of `seq_len` tokens never holds a longer segment anyway).
"""
from __future__ import annotations

import numpy as np
import torch


def segment_starts(tokens: torch.Tensor, bos_id: int, max_doc_len: int = 0) -> torch.Tensor:
    """Bool (..., T): True where a segment starts, for every row (last dim) of `tokens`."""
    T = tokens.shape[-1]
    doc = tokens == bos_id
    if T == 0:
        return doc
    doc[..., 0] = True  # the row start opens a segment (a prefix before the first BOS is its own)
    if max_doc_len <= 0:
        return doc
    pos = torch.arange(T, device=tokens.device)
    doc_start = torch.where(doc, pos, 0).cummax(dim=-1).values  # start of each position's document
    return (pos - doc_start) % max_doc_len == 0  # (..., T)


def segment_ids(tokens: torch.Tensor, bos_id: int, max_doc_len: int = 0) -> torch.Tensor:
    """int32 (..., T): segment number of every position within its row (1 = the row's first)."""
    return segment_starts(tokens, bos_id, max_doc_len).cumsum(dim=-1, dtype=torch.int32)


def boundaries(tokens, bos_id: int, max_doc_len: int = 0):
    """Sorted int64 segment starts of a 1-D stream, plus its end: 0 and len(tokens) included.

    Takes and returns a torch tensor (on its device) or a numpy array."""
    as_numpy = not isinstance(tokens, torch.Tensor)
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64)) if as_numpy else tokens
    if t.ndim != 1:
        raise ValueError(f"boundaries: expected a 1-D token stream, got shape {tuple(t.shape)}")
    starts = torch.nonzero(segment_starts(t, bos_id, max_doc_len)).flatten()
    out = torch.cat([starts, torch.tensor([t.numel()], device=t.device)])
    return out.numpy() if as_numpy else out
