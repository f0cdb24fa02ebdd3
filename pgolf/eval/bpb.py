"""Tokenizer-true bits per byte over the validation split (docs/records/record-stack.md §1.4).

`val_bpb = Σ loss_i / (ln 2 · Σ bytes_i)` over every scored target. The bytes of each target come from
`pgolf.data.bytes` (the challenge's lookup tables, or the CaseOps sidecars).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.data import shards
from pgolf.data.build import check_tokenizer_pairing, default_tokenizer_path
from pgolf.data.bytes import build_luts, target_bytes
from pgolf.data.tokenizer import BOS_ID, load_tokenizer
from pgolf.errors import PgolfError


@dataclass
class ValSet:
    tokens: torch.Tensor  # (N+1,) int64: inputs tokens[:-1], targets tokens[1:]
    bytes: torch.Tensor  # (N,) int16: bytes[i] is the byte count of target tokens[i+1]
    doc_starts: torch.Tensor  # (D,) int64: positions of BOS in `tokens`
    byte_source: str  # "lut" or "sidecar" (CaseOps)

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1

    @property
    def total_bytes(self) -> int:
        return int(self.bytes.sum())


def load_val(data_dir: str | Path, tokenizer_path: str | Path | None, vocab_size: int, seq_len: int,
             max_tokens: int = 0, bos_id: int = BOS_ID) -> ValSet:
    """The validation stream truncated to whole `seq_len` sequences (+1 for the last target).

    `max_tokens > 0` caps the scored targets (rounded down to whole sequences) for quick evals.
    """
    tok_path = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path(data_dir)
    sp = load_tokenizer(tok_path)
    check_tokenizer_pairing(data_dir, tok_path, sp, vocab_size)
    val = shards.load_split(data_dir, "val", vocab_size)
    usable = (val.size - 1) // seq_len * seq_len
    if max_tokens > 0:
        usable = min(usable, max_tokens // seq_len * seq_len)
    if usable <= 0:
        raise PgolfError(f"{data_dir}: validation split ({val.size} tokens) is shorter than one "
                         f"sequence of {seq_len} (+1) tokens")
    tokens = torch.from_numpy(val[:usable + 1].astype(np.int64))
    sidecars = shards.list_shards(data_dir, "val_bytes")
    if sidecars:
        side = shards.load_split(data_dir, "val_bytes")
        if side.size != val.size:
            raise PgolfError(f"{sidecars[0].parent}: byte sidecars hold {side.size} entries for {val.size} "
                             "validation tokens (they must be parallel)")
        nbytes, source = torch.from_numpy(side[1:usable + 1].astype(np.int16)), "sidecar"
    else:
        nbytes, source = target_bytes(tokens[:-1], tokens[1:], build_luts(sp, vocab_size)), "lut"
    doc_starts = torch.nonzero(tokens == bos_id).flatten()
    return ValSet(tokens=tokens, bytes=nbytes, doc_starts=doc_starts, byte_source=source)


def bpb_from_sums(loss_sum_nats, token_count, byte_count) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) from summed per-token losses, in float64."""
    loss_sum, ntok, nbytes = float(loss_sum_nats), float(token_count), float(byte_count)
    if ntok <= 0 or nbytes <= 0:
        raise ValueError(f"bpb_from_sums: need positive token and byte counts, got {ntok} and {nbytes}")
    return loss_sum / ntok, loss_sum / (math.log(2) * nbytes)


def allreduce_sums(*values, device=None) -> tuple[float, ...]:
    """Sum scalars (numbers or 0-d tensors) over all ranks as one float64 tensor; identity without
    torch.distributed. float64 because the byte and loss sums reach ~1.5e8 over the full split."""
    if device is None:
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), "cpu")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return tuple(t.tolist())
