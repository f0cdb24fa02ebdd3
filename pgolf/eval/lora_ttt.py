"""Per-document LoRA test-time training through the model's one forward (docs/records/record-stack.md §5.2-5.3).

Documents (BOS to next BOS inclusive) are sorted by length and batched, one document per row,
right-padded with 0 (causal attention keeps padding inert). Each document is cut into chunks of
`ttt.chunk_size` targets; the context of a chunk is the last <= `ttt.eval_seq_len` tokens ending at
the chunk's end. Per chunk: **score** (per-token CE into the ledger), **then** one AdamW step on
Σ_docs mean(chunk CE) for the documents not on their last chunk (PR #1530). At every batch B is
reset to 0, A is kept (`warm_start_a`, PR #1765) or re-drawn, and the optimizer state is zeroed.
Adapters are scaled by alpha/r (PR #1765) and sit on Q, K, V, O, MLP and the head (each switchable).

`eval.max_seconds` is enforced (ttt_base.Deadline): after every round of batches (one per rank) the
loop measures its seconds per forward/backward position; once adapting through the next round would
leave too little time to score the rest without adaptation, the remaining batches are scored that way:
the model as it stands, no adapters, no updates, in chunks of half the context window (every target
keeps >= eval_seq_len / 2 tokens of its document as context, all of it in documents that short), and
the result says where (`ttt_fallback`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pgolf.config import Config
from pgolf.eval.score import autocast_for, log_probs
from pgolf.eval.trace import EvalStream, find_docs
from pgolf.eval.ttt_base import ConvergenceLog, Deadline, TimeLedger, doc_batches, lora_targets, ttt_forward
from pgolf.model.attention import CAUSAL
from pgolf.model.lora import BatchedLoRA

if TYPE_CHECKING:
    from pgolf.model.gpt import GPT

LOG_EVERY_CHUNKS = 16  # convergence rows inside a batch of long documents (besides one per batch)


@dataclass
class Chunk:
    """Chunk c of every row of a batch; row offsets index the (B, W) window."""
    c: int
    x: torch.Tensor  # (B, W) inputs, right-padded with 0
    y: torch.Tensor  # (B, W) targets
    gi: torch.Tensor  # (B, K) window offsets of the chunk's targets
    valid: np.ndarray  # (B, K) real chunk targets
    pos: np.ndarray  # (B, K) their target positions in the validation stream
    doc: np.ndarray  # (B,) document index of each row (-1 = padding row)
    trains: np.ndarray  # (B,) rows that update after scoring (not on their last chunk)
    train_positions: np.ndarray  # targets of the windows of those rows (what the update reads)
    nll: torch.Tensor | None = None  # (B, K) from the scoring forward, kept for the update


class LoRATTT:
    """score -> update per chunk; subclasses (phased) hook `after_batch`; tests swap `step`."""
    name = "lora"

    def __init__(self, model: GPT, val: Any, cfg: Config, stream: EvalStream, *,
                 log: ConvergenceLog | None = None, ledger: TimeLedger | None = None,
                 rank: int = 0, world_size: int = 1):
        self.model, self.cfg, self.tc = model, cfg, cfg.ttt
        self.stream, self.log, self.ledger = stream, log, ledger or TimeLedger(cfg.eval.max_seconds)
        self.deadline = Deadline(self.ledger.budget, self.ledger.clock)  # the TTT timer starts here
        self.rank, self.world_size = rank, world_size
        self.device = next(model.parameters()).device
        self.V = cfg.model.vocab_size
        self.tokens = val.tokens.cpu().numpy()  # (N+1,)
        self.nbytes = val.bytes.cpu().numpy()  # (N,)
        self.docs = stream.docs if stream.docs is not None else find_docs(val.tokens, cfg.data.bos_id)
        self.batches = doc_batches(self.docs, self.tc.batch_size)
        self.phase = 0  # global phases completed (phased TTT)
        self.lora = self.new_lora()
        self.forward_at = ttt_forward(model, cfg)  # compiled on CUDA (pgolf.model.compile)
        self.opt: torch.optim.Optimizer | None = None

    def new_lora(self) -> BatchedLoRA:
        tc = self.tc
        return BatchedLoRA(self.model, tc.batch_size, tc.lora_rank, tc.lora_alpha, lora_targets(tc))

    # ---- the loop
    def run(self) -> dict[str, Any]:
        req = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)  # only the adapters train
        was_training = self.model.training
        self.model.eval()
        cum = np.cumsum(self.work_plan())
        try:
            for b, docs in enumerate(self.batches):
                if b % self.world_size == self.rank:  # deterministic split, no work stealing
                    self.run_batch(b, docs)
                if (b + 1) % self.world_size == 0:  # a round: every rank checks the deadline here
                    nxt = cum[min(b + self.world_size, cum.size - 1)] - cum[b]  # this rank's next round
                    self.check_deadline(b + 1, float(cum[b]), float(nxt), float(cum[-1] - cum[b]))
                self.after_batch(b)
        finally:
            for p, r in zip(self.model.parameters(), req):
                p.requires_grad_(r)
            self.model.train(was_training)
        self.stream.finish()
        out = self.stream.metrics(self.device)
        out["updates"] = self.stream.step
        out["ttt_fallback"] = self.deadline.result(out["tokens"])
        if self.log is not None:
            self.log.done(phase=self.phase)
        return out

    def after_batch(self, b: int) -> None:
        """Called on every rank after batch b (a collective point for phased TTT)."""

    # ---- the deadline
    def batch_work(self, docs: np.ndarray) -> float:
        """Forward/backward positions of a batch: rows x the window width of each chunk (the window of
        chunk c is min((c + 1) C, longest document, eval_seq_len) wide)."""
        C, S = self.tc.chunk_size, self.tc.eval_seq_len
        longest = int(self.docs.lengths[docs].max()) if len(docs) else 0
        ends = np.minimum(np.arange(1, -(-longest // C) + 1) * C, longest)
        return float(self.tc.batch_size * np.minimum(ends, S).sum())

    def work_plan(self) -> np.ndarray:
        """This rank's work at each batch index (0 where another rank runs the batch)."""
        return np.array([self.batch_work(d) if b % self.world_size == self.rank else 0.0
                         for b, d in enumerate(self.batches)])

    def check_deadline(self, b: int, done: float, nxt: float, left: float) -> None:
        """Before batch b: fall back to scoring without adaptation if adapting on would overrun."""
        if self.deadline.fallback is not None or b >= len(self.batches):
            return
        if self.deadline.overrun(done, nxt, left, self.device, self.stream.count, at_batch=b,
                                 at_document=int(self.batches[b][0]),
                                 documents_left=int(sum(len(d) for d in self.batches[b:]))):
            if self.log is not None:
                self.log.fallback(phase=self.phase, **(self.deadline.fallback or {}))

    def run_batch(self, b: int, docs: np.ndarray) -> None:
        if self.deadline.fallback is not None:
            return self.score_plain(b, docs)
        tc = self.tc
        shared = self.lora
        fork = [self.device] if self.device.type == "cuda" else []
        if len(docs) < tc.batch_size:
            # a batch short of batch_size documents trains adapters of its own, dropped after it, as the
            # record's `eval_val_ttt_phased` (only a full batch reuses `reusable_lora`): the next batch
            # starts from the shared adapters as the last full batch left them
            with torch.random.fork_rng(devices=fork):
                torch.manual_seed(b)  # the same on any number of ranks
                self.lora = self.new_lora()
        try:
            self.lora.reset_B()
            if not tc.warm_start_a:  # re-drawn from the batch index: the same on any number of ranks
                with torch.random.fork_rng(devices=fork):
                    torch.manual_seed(b)
                    self.lora.reset_A()
            self.opt = torch.optim.AdamW(self.lora.parameters(), lr=tc.lora_lr, betas=(tc.beta1, tc.beta2),
                                         eps=tc.eps, weight_decay=tc.weight_decay)  # fresh state per batch
            starts, lens, doc = self.rows(docs)
            nch = -(-lens // tc.chunk_size)  # chunks per row (0 for padding rows)
            for c in range(int(nch.max())):
                self.step(self.chunk(c, starts, lens, nch, doc))
                if self.log is not None and c % LOG_EVERY_CHUNKS == LOG_EVERY_CHUNKS - 1 and c < nch.max() - 1:
                    self.log.batch(b, phase=self.phase, kind="chunk", chunk=c)  # long batches: points inside
        finally:
            self.lora = shared
        if self.log is not None:
            self.log.batch(b, phase=self.phase, docs=len(docs))

    def rows(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, length, document index) per row of a batch; padding rows have length 0, doc -1."""
        B, n = self.tc.batch_size, len(docs)
        starts, lens, doc = np.zeros(B, np.int64), np.zeros(B, np.int64), np.full(B, -1, np.int64)
        starts[:n], lens[:n], doc[:n] = self.docs.starts[docs], self.docs.lengths[docs], docs
        return starts, lens, doc

    def score_plain(self, b: int, docs: np.ndarray) -> None:
        """After the deadline's fallback: score without adaptation, in chunks of half the context."""
        size = max(self.tc.chunk_size, self.tc.eval_seq_len // 2)
        starts, lens, doc = self.rows(docs)
        nch = -(-lens // size)
        for c in range(int(nch.max())):
            self.score(self.chunk(c, starts, lens, nch, doc, size), adapted=False)
        if self.log is not None:
            self.log.batch(b, phase=self.phase, docs=len(docs))

    def step(self, ch: Chunk) -> None:
        """Score, THEN update (Issue #1017 condition 3)."""
        self.score(ch)
        self.update(ch)

    # ---- one chunk
    def chunk(self, c: int, starts: np.ndarray, lens: np.ndarray, nch: np.ndarray, doc: np.ndarray,
              size: int = 0) -> Chunk:
        C, S, N = size or self.tc.chunk_size, self.tc.eval_seq_len, self.tokens.size - 1
        active = c < nch
        cs = c * C
        ce = np.where(active, np.minimum(cs + C, lens), 0)  # chunk end (doc-relative)
        a = np.where(active, np.maximum(ce - S, 0), 0)  # context start
        w = ce - a  # window width per row
        W = max(int(w.max()), 2)  # >= 2: a compiled graph specialises sizes 0 and 1 (padding is inert)
        cols = np.arange(W)
        inside = cols < w[:, None]  # (B, W)
        src = np.where(inside, (starts + a)[:, None] + cols, 0)
        x = np.where(inside, self.tokens[src], 0)
        y = np.where(inside, self.tokens[np.minimum(src + 1, N)], 0)
        clen = np.where(active, ce - cs, 0)
        K = max(int(clen.max()), 2)
        kc = np.arange(K)
        valid = kc < clen[:, None]  # (B, K)
        gi = np.where(valid, (w - clen)[:, None] + kc, 0)
        pos = (starts + cs)[:, None] + kc
        trains = active & (c < nch - 1)  # no update on a document's last chunk
        # an update reads the window's targets and its first input (the target before it, unless
        # that input is the document's own BOS)
        lo = starts + a - (a > 0)
        hi = starts + ce
        train_pos = np.concatenate([np.arange(lo[r], hi[r]) for r in np.flatnonzero(trains)] or
                                   [np.zeros(0, np.int64)])
        dev = self.device
        return Chunk(c, torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(gi).to(dev),
                     valid, pos, doc, trains, train_pos)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the full vocabulary from the model's soft-capped logits."""
        return log_probs(logits)

    def nll(self, ch: Chunk, adapted: bool = True) -> torch.Tensor:
        """Per-token CE (B, K) of the chunk's targets: the model's one forward with the adapters.

        Every row is one document, so attention is plain causal (CAUSAL), as the records' TTT forward.
        Scoring without adaptation (after a deadline fallback) runs the model eagerly: its graph would
        otherwise be compiled for the first time at the moment time is short."""
        fwd = self.forward_at if adapted else self.model.forward_at
        with autocast_for(self.device):
            z = fwd(ch.x, ch.gi, lora=self.lora if adapted else None, mask=CAUSAL)  # (B, K, V)
        return self.stream.score(self.distribution(z), ch.y.gather(1, ch.gi), self.V)

    def score(self, ch: Chunk, adapted: bool = True) -> None:
        # with grad whenever adapted, also on a batch's last chunk (nothing trains): one compiled graph
        # serves every chunk, as the records' TTT forward
        with self.deadline.scoring(), torch.set_grad_enabled(adapted):
            nll = self.nll(ch, adapted)  # (B, K); the graph is kept for the update that follows
        v = torch.from_numpy(ch.valid).to(self.device)
        pos = ch.pos[ch.valid]
        rows = np.broadcast_to(ch.doc[:, None], ch.valid.shape)[ch.valid]
        self.stream.record(pos, rows, nll.detach()[v], self.nbytes[pos])
        ch.nll = nll if nll.requires_grad and ch.trains.any() else None

    def update(self, ch: Chunk) -> None:
        if not ch.trains.any():
            return
        m = torch.from_numpy(ch.valid & ch.trains[:, None]).to(self.device, torch.float32)  # (B, K)
        for g in range(self.tc.grad_steps):
            with torch.enable_grad():
                nll = ch.nll if g == 0 and ch.nll is not None else self.nll(ch)
                loss = ((nll * m).sum(1) / m.sum(1).clamp_min(1)).sum()  # Σ_docs mean chunk CE
            self.stream.declare_update(ch.train_positions)
            assert self.opt is not None  # run_batch made it
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        ch.nll = None
