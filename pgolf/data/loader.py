"""Training batches: a sequential stream over the train shards, and random calibration windows.

The stream follows the records' loader (docs/records/record-stack.md §1.2): shards in sorted order, no shuffling;
a span that would cross a shard's end drops that shard's remainder and starts at the next shard,
wrapping around after the last. `shard_end="step"`: each optimizer step takes ONE span of
`accum_steps * world_size * (micro_tokens + 1)` tokens; micro-step m of rank r is chunk
`m * world_size + r`, so one process with accumulation A*W sees exactly the chunks that W
processes with accumulation A see, shard ends included. `"micro"` (the #1530 line's
`DocumentPackingLoader._prepare_batch`): each micro-step takes its own span of
`world_size * (micro_tokens + 1)` tokens, so a step's micro-steps may straddle two shards. Both give
the same chunks until a shard's end falls inside a step. `"splice"` (the root `train_gpt.py`'s
`TokenStream.take`): each micro-step's span takes the shard's rest and the next shard's start, so nothing
is dropped (docs/fidelity.md, procedure 19).

Segmentation `rows` cuts each chunk into fixed rows of `seq_len`. `varlen` (PR #1530, record
`DocumentPackingLoader`) yields each chunk as ONE packed row; the model cuts it into segments
(`pgolf.data.segments`), and the stream starts at the first BOS of every shard it opens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data import shards
from pgolf.data.build import require_data_dir
from pgolf.errors import PgolfError


def _train_files(data_dir: str | Path) -> list[Path]:
    files = shards.list_shards(require_data_dir(data_dir), "train")
    if not files:
        raise PgolfError(f"{data_dir}: no fineweb_train_*.bin shards found")
    return files


def _first_bos(tokens: np.ndarray, bos_id: int, block: int = 1 << 16) -> int:
    """Index of the first BOS (0 when there is none), reading the shard a block at a time."""
    for lo in range(0, tokens.size, block):
        hit = np.flatnonzero(tokens[lo:lo + block] == bos_id)
        if hit.size:
            return lo + int(hit[0])
    return 0


class TrainLoader:
    def __init__(self, data_dir: str | Path, seq_len: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None, segmentation: str = "rows", bos_id: int = 1,
                 shard_end: str = "step"):
        if not 0 <= rank < world_size:
            raise PgolfError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if segmentation not in ("rows", "varlen"):
            raise PgolfError(f"data.segmentation: unknown segmentation {segmentation!r} (rows | varlen)")
        if shard_end not in ("step", "micro", "splice"):
            raise PgolfError(f"data.shard_end: unknown value {shard_end!r} (step | micro | splice)")
        self.data_dir, self.seq_len, self.rank, self.world_size = Path(data_dir), seq_len, rank, world_size
        self.vocab_size = vocab_size
        self.packed, self.bos_id, self.per_micro = segmentation == "varlen", bos_id, shard_end != "step"
        self.splice = shard_end == "splice"
        self.files = _train_files(data_dir)
        # every header and file size up front (cheap), before any timed step
        if not sum(shards.read_header(f) for f in self.files):
            raise PgolfError(f"{self.data_dir}: the train shards hold no tokens")
        self.reset()

    def reset(self) -> None:
        """Rewind to the start of the first shard."""
        self._open(0)

    def _open(self, shard: int) -> None:
        self.shard = shard
        self.tokens = shards.read_shard(self.files[shard])
        self.pos = _first_bos(self.tokens, self.bos_id) if self.packed else 0

    def _check_ids(self, span: np.ndarray) -> None:
        """Reject ids outside the vocabulary in the span actually taken (a few microseconds per step,
        instead of a full scan of a 100M-token shard the first time it is opened)."""
        if self.vocab_size is not None and span.size and int(span.max()) >= self.vocab_size:
            raise PgolfError(f"{self.files[self.shard]}: token id {int(span.max())} >= vocab_size "
                             f"{self.vocab_size} (vocabulary mismatch: shards and tokenizer/model come "
                             "from different vocabularies)")

    def _take(self, n: int) -> np.ndarray:
        if self.splice:  # the root script's TokenStream.take: a shard's rest, then the next one's start
            parts = []
            while n > 0:
                if self.pos >= self.tokens.size:
                    self._open((self.shard + 1) % len(self.files))
                parts.append(self.tokens[self.pos:self.pos + n])
                self.pos += parts[-1].size
                n -= parts[-1].size
            span = np.concatenate(parts)
            self._check_ids(span)
            return span
        for _ in range(len(self.files) + 1):
            if self.pos + n <= self.tokens.size:
                span = self.tokens[self.pos:self.pos + n]
                self._check_ids(span)
                self.pos += n
                return span
            self._open((self.shard + 1) % len(self.files))  # drop the remainder, as the records do
        raise PgolfError(f"{self.data_dir}: no train shard holds a span of {n} tokens "
                         "(lower train_batch_tokens / micro_batch_tokens or use larger shards)")

    def next_batch(self, micro_tokens: int, accum_steps: int = 1,
                   device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`accum_steps` pairs (x, y) of int64 tensors shaped (micro_tokens // seq_len, seq_len), or
        (1, micro_tokens) for packed rows (varlen)."""
        if micro_tokens <= 0 or micro_tokens % self.seq_len:
            raise PgolfError(f"micro-batch of {micro_tokens} tokens: must be a positive multiple of "
                             f"seq_len {self.seq_len}")
        chunk = micro_tokens + 1  # +1: the last input's target
        n = self.world_size * chunk  # one micro-step of every rank
        span = None if self.per_micro else self._take(accum_steps * n)
        out = []
        for m in range(accum_steps):
            s = self._take(n) if span is None else span[m * n:(m + 1) * n]  # micro: shard end checked here
            c = torch.from_numpy(s[self.rank * chunk:(self.rank + 1) * chunk].astype(np.int64))
            row = micro_tokens if self.packed else self.seq_len
            x, y = c[:-1].view(-1, row), c[1:].view(-1, row)  # (B, T) each
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out.append((x, y))
        return out


def calibration_batches(data_dir: str | Path, n_batches: int, seqs: int, seq_len: int, seed: int = 0,
                        rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """`n_batches` int64 tensors (seqs, seq_len) of random non-overlapping windows from the TRAIN
    shards only (GPTQ calibration, docs/records/record-stack.md §4.2), drawn as the #1530-line records'
    `ShuffledSequenceLoader` draws them: rank r reads shards files[r::world_size]; each shard's windows
    (seq_len + 1 tokens, the inputs kept) start at a random phase below seq_len and are shuffled; each
    window comes from a shard chosen in proportion to the windows it has left, the last of its shuffled
    list. The RNG is the record's `PCG64(rank)` for seed 0 and is seeded by (seed, rank) otherwise, so
    seed 0 gives the record's windows."""
    files = _train_files(data_dir)
    mine = files[rank::world_size] or files  # more ranks than shards: share them
    rng = np.random.default_rng(rank if seed == 0 else [seed, rank])  # default_rng(r) is PCG64(r)
    starts: list[list[int]] = []
    for f in mine:
        n = shards.read_header(f)
        max_phase = min(seq_len - 1, max(0, n - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        order = rng.permutation(max(0, (n - 1 - phase) // seq_len))
        starts.append((phase + order * seq_len).tolist())
    need = n_batches * seqs
    remaining = np.array([len(s) for s in starts], dtype=np.float64)
    if remaining.sum() < need:
        raise PgolfError(f"{data_dir}: train shards hold {int(remaining.sum())} windows of {seq_len} tokens for "
                         f"rank {rank}, calibration needs {need} ({n_batches} x {seqs})")
    tokens: dict[int, np.ndarray] = {}
    windows = np.empty((need, seq_len), np.int64)
    for j in range(need):
        si = int(rng.choice(len(mine), p=remaining / remaining.sum()))
        start = starts[si].pop()
        remaining[si] -= 1
        if si not in tokens:
            tokens[si] = shards.read_shard(mine[si])
        windows[j] = tokens[si][start:start + seq_len]
    return list(torch.from_numpy(windows).view(n_batches, seqs, seq_len).unbind(0))
