"""Score-first SGD test-time training of the #549 / #430 line (docs/records/hedge-stack.md §6).

The stream is cut into chunks of `ttt.sgd_chunk_tokens` targets; each scoring window (sliding with
`eval.stride`, or non-overlapping) belongs to the chunk of its first scored target. For chunk c:
1. score its windows under no_grad with the current weights;
2. then, unless c is the last chunk, train on the chunk's tokens for `sgd_epochs` steps (one step per
   epoch over all of the chunk's sequences, gradients summed over ranks, clipped), with the LR cosine
   across chunks. `sgd_params`: all (#549) or last2 (last two blocks + norm/scale/head, #688 family);
   `sgd_optimizer`: sgd (#549: momentum, persistent across chunks) or adamw (#688 family).
The #688 family's extras (docs/records/hedge-stack.md §6.2), each a switch and all off by default:
- `sgd_lr_ramp` R: the chunk LR is the cosine times (1 + (R - 1) min(c / 0.3n, 1)) (R = 3: up to 3x);
- `sgd_byte_weighted`: the training CE of each target is weighted by its byte count (the scoring LUT);
- `sgd_polyak` d: an EMA (decay d) of the trained parameters, updated after every step; chunks c >= 1
  are scored with the averaged weights, training continues on the raw ones;
- `sgd_temperature` T: scores use softmax(z / tau) with tau = clamp(1 - (1 - T)(1 - H / ln V), 0.9, 1.05),
  H the entropy of softmax(z): a function of the logits alone, so still one normalised distribution.
`eval.max_seconds` is enforced (ttt_base.Deadline, like #430's TTT_TIME_LIMIT but predicted, not
waited for): before each chunk the finish is predicted from the seconds per chunk so far and the share
of them spent scoring; once training on the next chunk would leave too little time to score the rest,
the remaining chunks are scored without training (and, for Hedge, without moving the mixer), and the
result says where (`ttt_fallback`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import PgolfError
from pgolf.eval.score import autocast_for, doc_masking, log_probs, score_windows, window_plan
from pgolf.eval.trace import EvalStream
from pgolf.eval.ttt_base import ConvergenceLog, Deadline, TimeLedger, all_reduce_grads, cosine_lr
from pgolf.model.gpt import GPT
from pgolf.optim.ema import EMA


def select_params(model: GPT, which: str) -> list[torch.nn.Parameter]:
    """all, or last2: the last two blocks plus every norm / scale / head parameter
    (docs/records/hedge-stack.md §6.2)."""
    if which == "all":
        return list(model.parameters())
    if which != "last2":
        raise PgolfError(f"ttt.sgd_params: unknown selection {which!r} (all | last2)")
    L = len(model.blocks)
    last = (f"blocks.{L - 2}.", f"blocks.{L - 1}.")
    return [p for n, p in model.named_parameters()
            if n.startswith(last) or any(s in n for s in ("norm", "scale", "lm_head"))]


def ramped_lr(lr: float, c: int, n: int, ramp: float) -> float:
    """The #688 family's chunk LR: cosine across chunks times a ramp to `ramp`x over the first 30%."""
    up = 1.0 + (ramp - 1.0) * min(c / (0.3 * n), 1.0) if n > 0 else 1.0
    return cosine_lr(lr, c, n) * up


def adaptive_temperature(logits: torch.Tensor, target: float) -> torch.Tensor:
    """tau per position (..., 1): clamp(1 - (1 - T)(1 - H / ln V), 0.9, 1.05) (docs/records/hedge-stack.md §5.2)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    H = -(logp.exp() * logp).sum(dim=-1, keepdim=True)
    return (1.0 - (1.0 - target) * (1.0 - H / math.log(logits.shape[-1]))).clamp(0.9, 1.05)


def tempered_log_probs(logits: torch.Tensor, target: float) -> torch.Tensor:
    """log softmax(z / tau) over the full vocabulary (T = 1: the plain neural distribution)."""
    if target == 1.0:
        return log_probs(logits)
    z = logits.float()
    return F.log_softmax(z / adaptive_temperature(z, target), dim=-1)


def make_optimizer(params: list[torch.nn.Parameter], tc: Any) -> torch.optim.Optimizer:
    kind = getattr(tc, "sgd_optimizer", "sgd")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=tc.sgd_lr, momentum=tc.sgd_momentum)
    if kind == "adamw":  # the #688 family: AdamW (0.9, 0.999), no weight decay
        return torch.optim.AdamW(params, lr=tc.sgd_lr, betas=(0.9, 0.999), weight_decay=0.0)
    raise PgolfError(f"ttt.sgd_optimizer: unknown optimizer {kind!r} (sgd | adamw)")


class SGDTTT:
    """score chunk -> train on chunk; HedgeTTT overrides `distribution` / `after_score_batch`."""
    name = "sgd"

    def __init__(self, model: GPT, val: Any, cfg: Any, stream: EvalStream, *,
                 log: ConvergenceLog | None = None, ledger: TimeLedger | None = None,
                 rank: int = 0, world_size: int = 1):
        self.model = copy.deepcopy(model)  # the base weights train: never the caller's model
        self.cfg, self.tc = cfg, cfg.ttt
        self.stream, self.log, self.ledger = stream, log, ledger or TimeLedger(cfg.eval.max_seconds)
        self.deadline = Deadline(self.ledger.budget, self.ledger.clock)  # the TTT timer starts here
        self.rank, self.world_size = rank, world_size
        self.device = next(model.parameters()).device
        self.V = cfg.model.vocab_size
        self.val = val
        self.tokens = val.tokens.cpu().numpy()
        self.N = self.tokens.size - 1
        self.seq_len = cfg.eval.seq_len or cfg.train.eval_seq_len
        self.windows = window_plan(self.N, self.seq_len, cfg.eval.stride)
        self.C = self.tc.sgd_chunk_tokens
        self.n_chunks = -(-self.N // self.C)
        self.win_chunk = self.windows[2] // self.C  # chunk of each window's first scored target
        self.params = select_params(self.model, self.tc.sgd_params)
        self.opt = make_optimizer(self.params, self.tc)  # momentum persists across chunks (#549)
        tc = self.tc
        if not (0.0 <= tc.sgd_polyak < 1.0 and tc.sgd_lr_ramp >= 1.0 and 0.0 < tc.sgd_temperature <= 2.0):
            raise PgolfError(f"ttt.sgd_polyak {tc.sgd_polyak} / sgd_lr_ramp {tc.sgd_lr_ramp} / sgd_temperature "
                             f"{tc.sgd_temperature}: need 0 <= polyak < 1, ramp >= 1, 0 < temperature <= 2")
        # the trainer's EMA (the frozen parameters' average stays exactly their value)
        self.polyak = EMA(self.model, tc.sgd_polyak) if tc.sgd_polyak > 0 else None
        self.target_bytes = val.bytes.to(torch.float32).cpu().numpy()  # bytes of target i+1, per position i

    def run(self) -> dict[str, Any]:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        for c in range(self.n_chunks):
            self.check_deadline(c)
            self.step(c)
            if self.log is not None:
                self.log.batch(c, chunk_tokens=min(self.C, self.N - c * self.C))
        self.stream.finish()
        out = self.stream.metrics(self.device)
        out["updates"] = self.stream.step
        out["ttt_fallback"] = self.deadline.result(out["tokens"])
        if self.log is not None:
            self.log.done()
        return out

    def check_deadline(self, c: int) -> None:
        """Before chunk c (every rank): fall back to scoring without adaptation on a predicted overrun."""
        if c == 0 or not self.adapting():
            return
        first, docs = c * self.C, self.stream.docs
        where = {"at_chunk": c, "at_position": first,
                 "at_document": int(docs.of(first)[0]) if docs is not None else -1}
        if self.deadline.overrun(c, 1, self.n_chunks - c, self.device, self.stream.count, **where):
            assert self.deadline.fallback is not None  # overrun() recorded it
            if self.log is not None:
                self.log.fallback(**self.deadline.fallback)

    def adapting(self) -> bool:
        """False once the deadline fell back: no training, no mixer updates."""
        return self.deadline.fallback is None

    def step(self, c: int) -> None:
        """Score, THEN train (Issue #1017 condition 3)."""
        self.score(c)
        self.update(c)

    def neural(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's distribution as scored (tempered when `sgd_temperature` != 1)."""
        return tempered_log_probs(logits, self.tc.sgd_temperature)

    def distribution(self, logits: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        return self.neural(logits)

    @contextlib.contextmanager
    def scoring_weights(self, c: int) -> Iterator[None]:
        """Polyak: the averaged parameters score chunks c >= 1; the raw ones come back to train."""
        if self.polyak is None or c == 0:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.polyak.copy_to(self.model)
        try:
            yield
        finally:
            self.model.load_state_dict(raw)

    def after_score_batch(self, pos: np.ndarray, y: torch.Tensor, nll: torch.Tensor, valid: np.ndarray) -> None:
        """After a batch of windows was scored and recorded (mixers update here)."""

    def score(self, c: int) -> None:
        idx = np.flatnonzero(self.win_chunk == c)
        lo, hi = idx.size * self.rank // self.world_size, idx.size * (self.rank + 1) // self.world_size
        mine = tuple(w[idx[lo:hi]] for w in self.windows)
        self.model.eval()
        with self.deadline.scoring(), doc_masking(self.model, self.cfg.eval.doc_mask), self.scoring_weights(c):
            score_windows(self.model, self.val.tokens, self.val.bytes, mine, self.stream,
                          batch_seqs=self.cfg.eval.batch_seqs, vocab_size=self.V,
                          distribution=self.distribution, after_batch=self.after_score_batch)

    def update(self, c: int) -> None:
        tc = self.tc
        if c == self.n_chunks - 1 or tc.sgd_epochs <= 0 or not self.adapting():  # never the last chunk
            return
        lo, hi = c * self.C, min((c + 1) * self.C, self.N)
        first = max(lo - 1, 0)  # the chunk's first input is the target of position lo - 1
        self.stream.sync_scored(first, hi)
        for g in self.opt.param_groups:
            g["lr"] = ramped_lr(tc.sgd_lr, c, self.n_chunks, tc.sgd_lr_ramp)
        # the chunk's loss is a mean over all its targets (every rank), byte-weighted on request
        total = max(float(self.target_bytes[lo:hi].sum()), 1.0) if tc.sgd_byte_weighted else float(hi - lo)
        rows = list(range(lo, hi, self.seq_len))[self.rank::self.world_size]
        self.model.train()
        for _ in range(tc.sgd_epochs):
            self.stream.declare_update(np.arange(first, hi))
            self.opt.zero_grad(set_to_none=True)
            for i in range(0, len(rows), self.cfg.eval.batch_seqs):
                group = rows[i:i + self.cfg.eval.batch_seqs]
                for r0 in sorted({min(self.seq_len, hi - r) for r in group}):
                    sel = [r for r in group if min(self.seq_len, hi - r) == r0]
                    xb = torch.from_numpy(np.stack([self.tokens[r:r + r0] for r in sel])).to(self.device)
                    yb = torch.from_numpy(np.stack([self.tokens[r + 1:r + r0 + 1] for r in sel])).to(self.device)
                    with autocast_for(self.device):
                        if tc.sgd_byte_weighted:
                            w = torch.from_numpy(np.stack([self.target_bytes[r:r + r0] for r in sel])).to(self.device)
                            loss = (self.model(xb, yb, reduction="none").float() * w).sum() / total
                        else:
                            loss = self.model(xb, yb, reduction="sum") / total  # (b, r0) -> chunk mean
                    loss.backward()
            all_reduce_grads(self.params)
            if tc.sgd_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, tc.sgd_grad_clip)
            self.opt.step()
            if self.polyak is not None:
                self.polyak.update(self.model)
        self.model.eval()
