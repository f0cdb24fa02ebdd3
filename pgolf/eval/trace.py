"""The evaluation ledger: every score passes through `EvalStream.record`, every update through
`EvalStream.declare_update`, so legality is structure rather than a promise.

Positions are target indices of the validation stream: position i is the prediction of
`tokens[i + 1]` from `tokens[:i + 1]`, with `bytes[i]` bytes (pgolf.eval.bpb). Documents are found at
BOS: document k holds the targets [start_k, end_k), i.e. tokens[BOS_k ... BOS_{k+1}] inclusive of
the next BOS, so its end-of-document BOS prediction is scored (docs/records/record-stack.md §5.2).

The trace (`pgolf eval --trace FILE.npz`, docs/cli-contract.md) has one entry per scored
token in scoring order: position, doc, loss (nats), bytes, step (updates made before it was scored),
plus a summary of every update (`update_at`: tokens scored when it happened; `update_max_order`: the
latest trace index among the tokens it trained on) so `legality.audit_trace` can check it from outside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pgolf.errors import LegalityError

# `order` sentinels: never scored / scored on another rank / left out by the evaluation's plan
UNSCORED, REMOTE, EXCLUDED = -1, -2, -3


def _np(a: Any, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a).reshape(-1)
    return a.astype(dtype, copy=False) if dtype is not None else a


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class Docs:
    starts: np.ndarray  # (D,) first target position of each document (its BOS)
    ends: np.ndarray  # (D,) one past its last target position (the next BOS, or N)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __len__(self) -> int:
        return int(self.starts.size)

    def of(self, positions: Any) -> np.ndarray:
        """Document index of each target position."""
        return np.searchsorted(self.starts, _np(positions, np.int64), side="right") - 1


def find_docs(tokens: torch.Tensor | np.ndarray, bos_id: int) -> Docs:
    """Documents of a stream of N+1 tokens; a prefix before the first BOS is a document too."""
    t = _np(tokens)
    n = t.size - 1
    starts = np.flatnonzero(t[:n] == bos_id).astype(np.int64)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)
    ends = np.append(starts[1:], n).astype(np.int64)
    return Docs(starts, ends)


@dataclass
class Trace:
    position: np.ndarray  # (M,) int64, in scoring order
    doc: np.ndarray  # (M,) int64
    loss: np.ndarray  # (M,) float32 nats
    bytes: np.ndarray  # (M,) int16
    step: np.ndarray  # (M,) int64: updates of the eval-time model before this token was scored
    update_at: np.ndarray  # (U,) int64: tokens scored (this rank) when update u was made
    update_max_order: np.ndarray  # (U,) int64: latest trace index it trained on (-1 unscored, -2 remote)
    update_size: np.ndarray  # (U,) int64: positions it trained on
    num_targets: int = 0
    method: str = ""
    rank: np.ndarray | None = None  # (M,) with several ranks (each rank's entries in its own order)
    update_rank: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.position.size)

    def save(self, path: str | Path) -> Path:
        from pgolf.fileio import atomic_path

        path = Path(path)
        arrays: dict[str, Any] = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a reader never sees half a trace
            np.savez(f, num_targets=np.int64(self.num_targets), method=np.str_(self.method), **arrays)
        return path


def load_trace(path: str | Path) -> Trace:
    """A saved trace; `FILE.npz` written by several ranks is merged from `FILE.rank<r>.npz`."""
    path = Path(path)
    parts = sorted(path.parent.glob(f"{path.stem}.rank*.npz")) if not path.exists() else [path]
    if not parts:
        raise FileNotFoundError(path)
    traces = []
    for r, p in enumerate(parts):
        with np.load(p) as z:
            d = {k: z[k] for k in z.files}
        t = Trace(**{k: d[k] for k in ("position", "doc", "loss", "bytes", "step", "update_at",
                                       "update_max_order", "update_size")},
                  num_targets=int(d["num_targets"]), method=str(d["method"]))
        t.rank = d.get("rank", np.full(t.position.size, r, np.int64))
        t.update_rank = d.get("update_rank", np.full(t.update_at.size, r, np.int64))
        traces.append(t)
    if len(traces) == 1:
        return traces[0]
    cat = {k: np.concatenate([getattr(t, k) for t in traces]) for k in
           ("position", "doc", "loss", "bytes", "step", "update_at", "update_max_order", "update_size",
            "rank", "update_rank")}
    return Trace(**cat, num_targets=traces[0].num_targets, method=traces[0].method)


def trace_path(path: str | Path, rank: int, world_size: int) -> Path:
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}.rank{rank}.npz")


@dataclass
class EvalStream:
    """The ledger of one evaluation on one rank (see the module docstring).

    strict: raise LegalityError at the first violation (else collect them in `violations`).
    keep_trace: keep the per-token trace; keep_losses: keep each position's loss (for TTT-off curves).
    check_rows: rows of every scored distribution checked for normalisation (0 = all rows).
    """
    num_targets: int
    docs: Docs | None = None
    strict: bool = True
    keep_trace: bool = False
    keep_losses: bool = False
    check_rows: int = 8
    method: str = ""
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order = np.full(self.num_targets, UNSCORED, np.int32)  # trace index of each position (< 2^31)
        self.count = 0  # tokens scored on this rank
        self.step = 0  # updates declared so far
        self.sums = np.zeros(3, np.float64)  # loss (nats), tokens, bytes
        self.losses = np.full(self.num_targets, np.nan, np.float32) if self.keep_losses else None
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self._updates: list[tuple[int, int, int]] = []
        self.hooks: list[Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = []

    def _violate(self, msg: str) -> None:
        if self.strict:
            raise LegalityError(msg)
        self.violations.append(msg)

    # ---- scoring
    def record(self, positions: Any, docs: Any, losses: Any, nbytes: Any) -> None:
        """Score targets `positions` (documents `docs`, or None to look them up) with per-token
        `losses` (nats) and byte counts, in this order."""
        pos = _np(positions, np.int64)
        loss = _np(losses, np.float32)
        nb = _np(nbytes, np.int64)
        if not (pos.size == loss.size == nb.size):
            raise ValueError(f"record: {pos.size} positions, {loss.size} losses, {nb.size} byte counts")
        if pos.size == 0:
            return
        if pos.min() < 0 or pos.max() >= self.num_targets:
            raise ValueError(f"record: positions outside [0, {self.num_targets})")
        again = self.order[pos] != UNSCORED
        if again.any() or np.unique(pos).size != pos.size:
            self._violate(f"single pass: target position {int(pos[again][0]) if again.any() else int(pos[0])} "
                          "scored more than once")
        self.order[pos] = self.count + np.arange(pos.size)
        self.sums += (loss.sum(dtype=np.float64), pos.size, nb.sum(dtype=np.float64))
        if self.losses is not None:
            self.losses[pos] = loss
        if self.keep_trace:
            doc = _np(docs, np.int64) if docs is not None else \
                (self.docs.of(pos) if self.docs is not None else np.full(pos.size, -1, np.int64))
            self._chunks.append((pos, doc, loss, nb.astype(np.int16), np.full(pos.size, self.step, np.int64)))
        self.count += pos.size
        for hook in self.hooks:
            hook(pos, loss, nb)

    def score(self, logp: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """-log p(y) from a checked full distribution (legality.scored_nll)."""
        from pgolf.eval.legality import scored_nll
        return scored_nll(logp, targets, vocab_size=vocab_size, check_rows=self.check_rows)

    def exclude(self, positions: Any) -> None:
        """Targets this evaluation leaves out by design on every rank (the records' `eval_val` drops
        the tail of whole rows, `pgolf.eval.score.packed_plan`); they count as neither scored nor missing."""
        pos = _np(positions, np.int64)
        self.order[pos[self.order[pos] == UNSCORED]] = EXCLUDED

    # ---- updates
    def declare_update(self, positions: Any) -> None:
        """Declare the target positions the next update of the eval-time model trains on."""
        pos = _np(positions, np.int64)
        o = self.order[pos] if pos.size else np.zeros(0, np.int64)
        unscored = (o == UNSCORED) | (o == EXCLUDED)
        if unscored.any():
            self._violate(f"score before update: update {self.step} trains on target position "
                          f"{int(pos[unscored][0])} before it was scored ({int(unscored.sum())} such)")
        local = o[o >= 0]
        max_order = -1 if unscored.any() else (int(local.max()) if local.size else REMOTE)
        self._updates.append((self.count, max_order, int(pos.size)))
        self.step += 1

    def sync_scored(self, lo: int = 0, hi: int | None = None) -> None:
        """Mark positions [lo, hi) scored on other ranks as REMOTE (a collective when distributed)."""
        if not _distributed():
            return
        hi = self.num_targets if hi is None else hi
        mine = self.order[lo:hi] != UNSCORED
        dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
        allr = torch.from_numpy(mine.astype(np.int32)).to(dev)
        dist.all_reduce(allr)
        remote = (allr.cpu().numpy() > 0) & ~mine
        self.order[lo:hi][remote] = REMOTE

    # ---- results
    def finish(self) -> None:
        """Condition 4 over all ranks: every target scored exactly once (or left out by the plan)."""
        scored = torch.from_numpy((self.order >= 0).astype(np.int32))
        if _distributed():
            dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
            c = scored.to(dev)
            dist.all_reduce(c)
            scored = c.cpu()
        counts = scored.numpy()
        missing = int(((counts == 0) & (self.order != EXCLUDED)).sum())  # exclusions are the same on every rank
        twice = int((counts > 1).sum())
        if missing or twice:
            self._violate(f"single pass: {missing} targets never scored, {twice} scored on several ranks "
                          f"(of {self.num_targets})")

    def metrics(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """val_loss / val_bpb over all ranks (float64 sums all-reduced)."""
        from pgolf.eval.bpb import allreduce_sums, bpb_from_sums
        loss_sum, tokens, nbytes = allreduce_sums(*self.sums, device=device)
        val_loss, val_bpb = bpb_from_sums(loss_sum, tokens, nbytes)
        return {"val_loss": val_loss, "val_bpb": val_bpb, "tokens": int(tokens), "bytes": int(nbytes)}

    def trace(self) -> Trace:
        cols = list(zip(*self._chunks)) if self._chunks else [()] * 5
        position, doc, loss, nbytes, step = (np.concatenate(c) if c else np.zeros(0, dt) for c, dt in
                                             zip(cols, (np.int64, np.int64, np.float32, np.int16, np.int64)))
        ups = np.array(self._updates, np.int64).reshape(-1, 3)
        t = Trace(position, doc, loss, nbytes, step, update_at=ups[:, 0], update_max_order=ups[:, 1],
                  update_size=ups[:, 2], num_targets=self.num_targets, method=self.method)
        if _distributed():
            t.rank = np.full(len(t), dist.get_rank(), np.int64)
            t.update_rank = np.full(ups.shape[0], dist.get_rank(), np.int64)
        return t
