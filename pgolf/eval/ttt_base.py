"""What every test-time-training method shares (docs/records/record-stack.md §5,
docs/records/hedge-stack.md §5-6): document batches, the cosine schedule across chunks, the gradient
all-reduce, the evaluation time ledger and its deadline (`eval.max_seconds` enforced), the convergence
record (`ttt.jsonl`), the synthetic-token warm-up and the LoRA target list.

The methods (lora_ttt.py, phased.py, sgd_ttt.py, hedge.py) import from here; `pgolf.eval.ttt` sits
above them all and picks one (`runner_for`).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pgolf.config import Config, TTTConfig
from pgolf.eval.trace import Docs, EvalStream
from pgolf.model.gpt import GPT


def doc_batches(docs: Docs, batch_size: int) -> list[np.ndarray]:
    """Documents sorted by length, cut into batches; the queue runs longest first
    (docs/records/record-stack.md §5.2), batches whose longest documents tie in ascending order (record
    `_build_ttt_global_batches` sorts them stably by that length)."""
    order = np.argsort(docs.lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
    return [batches[i] for i in np.argsort([-docs.lengths[b[-1]] for b in batches], kind="stable")]


def cosine_lr(lr: float, i: int, n: int) -> float:
    """lr * (1 + cos(pi i / (n - 1))) / 2: the schedule across chunks of #549 and #1626."""
    return lr if n <= 1 else lr * 0.5 * (1.0 + math.cos(math.pi * i / (n - 1)))


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks (each rank's loss is already divided by the global token count)."""
    from pgolf.distributed import all_reduce_sum_

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    all_reduce_sum_(grads)  # one flat collective, not one per parameter


def _sync(device: torch.device | None = None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timed(clock: Callable[[], float], add: Callable[[float], None]) -> Iterator[None]:
    """Hand `add` the seconds the body took on `clock`, with the device synchronised at both ends."""
    _sync()
    t = clock()
    try:
        yield
    finally:
        _sync()
        add(clock() - t)


def _reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Each value maximised over ranks (the values themselves in a single process)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _sum_over_ranks(value: int, device: torch.device) -> int:
    from pgolf.distributed import all_reduce_sum_

    t = torch.tensor([value], dtype=torch.float64, device=device)
    all_reduce_sum_([t])
    return int(t.item())


class TimeLedger:
    """Seconds per evaluation phase (load, warm-up, scoring, TTT, each global phase) against the budget
    (`eval.max_seconds`; 0 = none). `clock` is what the ledger and the TTT deadline read (tests pass
    a simulated one)."""

    def __init__(self, budget_seconds: float = 600.0, clock: Callable[[], float] = time.perf_counter):
        self.budget = budget_seconds
        self.clock = clock
        self.seconds: dict[str, float] = {}

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return _timed(self.clock, lambda seconds: self.add(name, seconds))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self, timed: str | None = None) -> dict[str, Any]:
        """The ledger; `timed` names the entry counted against the budget (the records time the TTT loop)."""
        out: dict[str, Any] = {f"{k}_seconds": round(v, 3) for k, v in self.seconds.items()}
        out["total_seconds"] = round(sum(v for k, v in self.seconds.items() if not k.startswith("phase_")), 3)
        out["budget_seconds"] = self.budget
        if timed is not None:
            out["timed"] = timed
            out["within_budget"] = self.budget <= 0 or self.seconds.get(timed, 0.0) <= self.budget
        return out


DEADLINE_MARGIN = 0.05  # aim at 95% of the budget: throughput drifts between two checks


class Deadline:
    """`eval.max_seconds` enforced on the TTT loop (the records' TTT timer, docs/records/record-stack.md §5.7).

    A runner counts its work in units of about constant cost (LoRA: forward/backward positions, since
    the queue runs the longest documents first and those cost more per token; SGD / Hedge: chunks),
    wraps its scoring in `scoring()`, and before each round (points every rank reaches together) asks
    `overrun(done, nxt, left)`: may it adapt through the next round (`nxt` units) and still score the
    rest without adaptation in budget? With rate = seconds per unit so far and share = the part of
    those seconds spent scoring,

        elapsed + rate * (nxt + share * (left - nxt)) <= (1 - DEADLINE_MARGIN) * budget

    Scoring without adaptation costs at most what the scoring did while adapting (no backward, no
    optimizer; LoRA's fallback also uses wider chunks), so the share bounds it from above. The first
    "no" (maximised over ranks, so every rank agrees) records `fallback`, and from then on the runner
    scores the rest without adaptation. Until then nothing changes.
    """

    def __init__(self, budget: float, clock: Callable[[], float] = time.perf_counter):
        self.budget, self.clock = budget, clock
        self.t0 = clock()
        self.scoring_seconds = 0.0
        self.fallback: dict[str, Any] | None = None

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def scoring(self) -> contextlib.AbstractContextManager[None]:
        return _timed(self.clock, self._add_scoring)

    def _add_scoring(self, seconds: float) -> None:
        self.scoring_seconds += seconds

    def overrun(self, done: float, nxt: float, left: float, device: torch.device, scored: int,
                **where: Any) -> bool:
        """True from the first check at which adapting through the next round would overrun.

        `left` includes the next round's `nxt`; `scored`: tokens this rank has scored (the record holds
        the total over ranks); `where` names the point (batch / chunk, document) for the record."""
        if self.fallback is not None:
            return True
        if self.budget <= 0:  # the same on every rank: a rank-dependent return here would hang the others
            return False
        elapsed = self.elapsed()
        rate = elapsed / done if done > 0 else 0.0
        share = min(self.scoring_seconds / elapsed, 1.0) if elapsed > 0 else 1.0
        finish, adapting = _reduce_max([elapsed + rate * (nxt + share * (left - nxt)), elapsed + rate * left],
                                       device)
        if finish <= (1.0 - DEADLINE_MARGIN) * self.budget:
            return False
        self.fallback = {"reason": "predicted overrun of eval.max_seconds", "budget_seconds": self.budget,
                         "predicted_seconds": round(adapting, 3), "elapsed_seconds": round(elapsed, 3),
                         "scoring_share": round(share, 3), "at_token": _sum_over_ranks(scored, device), **where}
        return True

    def result(self, scored_total: int) -> dict[str, Any] | None:
        """The fallback record for the results (None when every token was scored with adaptation):
        `predicted_seconds` is the finish had adaptation gone on to the end."""
        if self.fallback is None:
            return None
        return {**self.fallback, "tokens_without_adaptation": scored_total - self.fallback["at_token"]}


class ConvergenceLog:
    """Per batch (or chunk) and per phase: running BPB against tokens scored, time, phase boundaries.

    One JSON line per event in `path` (rank 0 only; in a distributed run the running figures are rank
    0's partial sums, as in the records' logs). `baseline` (per position, nats) gives the running BPB
    of the model without TTT over the same tokens, so TTT on and off share one x axis. Positions the
    scoring without TTT never scored (NaN: the tail packed validation rows drop, record `eval_val`) are
    left out of that running figure, bytes and all; `no_ttt_tokens` says how many tokens it covers.
    """

    def __init__(self, path: str | Path | None, stream: EvalStream, *, method: str,
                 baseline: np.ndarray | None = None, eval_id: str | None = None, label: str = "",
                 echo: Any = None, echo_every: float = 10.0):
        self.path = Path(path) if path is not None else None
        self.echo, self.echo_every, self._echoed = echo, echo_every, -math.inf  # progress lines (stderr)
        self.stream, self.method, self.baseline, self.label = stream, method, baseline, label
        self.eval_id = eval_id or time.strftime("%Y%m%d-%H%M%S")
        self.t0 = time.perf_counter()
        self.base_sum, self.base_bytes, self.base_tokens = 0.0, 0.0, 0
        self.rows: list[dict[str, Any]] = []
        if baseline is not None:
            stream.hooks.append(self._on_record)

    def _on_record(self, pos: np.ndarray, loss: np.ndarray, nbytes: np.ndarray) -> None:
        assert self.baseline is not None  # the hook is registered only with a baseline
        base = self.baseline[pos]
        have = np.isfinite(base)
        self.base_sum += float(base[have].sum(dtype=np.float64))
        self.base_bytes += float(np.asarray(nbytes)[have].sum(dtype=np.float64))
        self.base_tokens += int(have.sum())

    def _emit(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {"eval_id": self.eval_id, "method": self.method, "label": self.label, **row,
               "seconds": round(time.perf_counter() - self.t0, 4)}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        now = time.perf_counter()
        if self.echo is not None and (row["kind"] in ("phase", "fallback", "done") or
                                      now - self._echoed >= self.echo_every):
            self._echoed = now
            base = f" (no TTT {row['bpb_no_ttt']:.4f})" if row.get("bpb_no_ttt") is not None else ""
            bpb = f"{row['bpb']:.4f}" if row.get("bpb") is not None else "-"
            self.echo(f"{self.method} {row['kind']} phase {row.get('phase', '-')}: {row['tokens']:,} tokens scored, "
                      f"running bpb {bpb}{base}, {row['step']} updates, {row['seconds']:.0f} s")
        return row

    def _running(self) -> dict[str, Any]:
        loss, ntok, nbytes = self.stream.sums.tolist()
        out = {"tokens": int(ntok), "bytes": int(nbytes), "step": self.stream.step,
               "bpb": loss / (math.log(2) * nbytes) if nbytes else None}
        if self.baseline is not None:
            out["bpb_no_ttt"] = self.base_sum / (math.log(2) * self.base_bytes) if self.base_bytes else None
            out["no_ttt_tokens"] = self.base_tokens
        return out

    def batch(self, batch: int, phase: int = 0, kind: str = "batch", **extra: Any) -> dict[str, Any]:
        """After a batch (LoRA) or chunk (SGD / Hedge); kind="chunk" marks a point inside a batch."""
        return self._emit({"kind": kind, "batch": batch, "phase": phase, **self._running(), **extra})

    def phase(self, phase: int, **extra: Any) -> dict[str, Any]:
        return self._emit({"kind": "phase", "phase": phase, **self._running(), **extra})

    def fallback(self, **extra: Any) -> dict[str, Any]:
        """The point where the deadline stopped adaptation (the rest is scored without it)."""
        return self._emit({"kind": "fallback", **self._running(), **extra})

    def done(self, **extra: Any) -> dict[str, Any]:
        return self._emit({"kind": "done", **self._running(), **extra})


def ttt_forward(model: GPT, cfg: Config):
    """LoRA TTT's `forward_at`: compiled on CUDA with train.compile (pgolf.model.compile.compile_ttt), as
    the records compile theirs; the model's own method elsewhere. Compiled copies share dynamo's code
    cache, so the warm-up's graph serves every later runner."""
    device = next(model.parameters()).device
    if device.type == "cuda" and cfg.train.compile:
        from pgolf.model.compile import compile_ttt
        return compile_ttt(model)
    return model.forward_at


def warmup(model: GPT, cfg: Config, *, lora: bool = True, base: bool = False, seed: int = 0) -> float:
    """Forward + backward at the TTT shapes on `torch.randint` tokens, never validation data
    (docs/records/record-stack.md §5.1, §7.8); the weights are left exactly as they were. Returns seconds.

    `lora`: LoRA TTT's step (adapters on a frozen base, `ttt_forward`) at the full context, then at one
    chunk; `base`: a forward + backward into the base weights too, one micro-batch of global SGD or of
    SGD / Hedge TTT at its own shape (`base_step_shape`)."""
    import torch.nn.functional as F

    from pgolf.eval.score import autocast_for, global_sgd_attention
    from pgolf.model.attention import CAUSAL
    from pgolf.model.lora import BatchedLoRA

    t0 = time.perf_counter()
    tc, V = cfg.ttt, cfg.model.vocab_size
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    req = [p.requires_grad for p in model.parameters()]
    fwd = ttt_forward(model, cfg) if lora else None
    try:
        # the full context first: the compiled graph it makes has the widths as symbols and serves every
        # later window (pgolf.model.compile)
        if fwd is not None:
            for T in sorted({min(tc.chunk_size, tc.eval_seq_len), tc.eval_seq_len}, reverse=True):
                x = torch.randint(0, V, (tc.batch_size, T + 1), generator=g).to(device)  # (B, T+1) synthetic
                for p in model.parameters():
                    p.requires_grad_(False)
                adapters = BatchedLoRA(model, tc.batch_size, tc.lora_rank, tc.lora_alpha, lora_targets(tc))
                K = min(tc.chunk_size, T)
                gi = torch.arange(T - K, T, device=device).repeat(tc.batch_size, 1)  # (B, K) as a chunk's
                with autocast_for(device):
                    z = fwd(x[:, :-1], gi, lora=adapters, mask=CAUSAL)  # (B, K, V)
                F.cross_entropy(z.flatten(0, 1), x[:, 1:].gather(1, gi).flatten()).backward()
        if base:  # one micro-batch of the base-weight updates, at the shape the runner trains on
            rows, T = base_step_shape(cfg)
            x = torch.randint(0, V, (rows, T + 1), generator=g).to(device)
            for p in model.parameters():
                p.requires_grad_(True)
            phased = global_sgd_attention(model, T) if tc.method == "lora" else contextlib.nullcontext(False)
            with phased as packed, autocast_for(device):
                xb, yb = x[:, :-1], x[:, 1:]
                if packed:  # global SGD's micro-batch is one packed row
                    xb, yb = xb.reshape(1, -1), yb.reshape(1, -1)
                model(xb, yb).backward()
    finally:
        for p, r in zip(model.parameters(), req):
            p.grad = None
            p.requires_grad_(r)
    _sync()
    return time.perf_counter() - t0


def base_step_shape(cfg: Config) -> tuple[int, int]:
    """(rows, tokens per row) of one micro-batch of the base-weight updates on one rank: global SGD
    (`ttt.phases`) takes up to `ttt.global_batch_seqs` of a chunk's `ttt.eval_seq_len` rows (one packed
    row on a packed-rows model: pgolf.eval.score.global_sgd_attention); SGD / Hedge TTT take
    `eval.batch_seqs` rows of the scoring window (pgolf.eval.sgd_ttt). On more ranks the rows split
    across them, so this is the largest micro-batch any rank runs."""
    tc = cfg.ttt
    if tc.method == "lora":
        return min(tc.global_batch_seqs, -(-tc.global_chunk_tokens // tc.eval_seq_len)), tc.eval_seq_len
    return cfg.eval.batch_seqs, cfg.eval.seq_len or cfg.train.eval_seq_len


def lora_targets(tc: TTTConfig) -> tuple[str, ...]:
    flags = {"q": tc.q_lora, "k": tc.k_lora, "v": tc.v_lora, "o": tc.o_lora, "mlp": tc.mlp_lora,
             "head": tc.head_lora}
    return tuple(k for k, on in flags.items() if on)
