"""Phased TTT: per-document LoRA plus multi-phase global SGD on the base model (docs/records/record-stack.md §5.5;
PR #1610 -> #1626 -> #1700).

The first `ttt.prefix_docs` documents of the queue are the prefix. When the count of fully scored
documents (in queue order) reaches boundary k = floor(P (k+1) / phases), every rank stops, and the
base model trains with SGD (momentum, cosine decay across chunks of `global_chunk_tokens`, the last
chunk skipped, gradient clipping) on `boundary` of the scored documents, cumulatively: the first ones
in queue order (`ttt.phase_select = queue`), or, as the records' `eval_val_ttt_phased`, the scored
documents sorted by (length-sorted batch index, position in batch), i.e. the shortest (`shortest`).
Every one of those documents was scored before: the ledger checks it. With packed rows (varlen) each
micro-batch of sequences is one packed row, cut at BOS and every `eval_seq_len` tokens from a
document's start. `ttt.global_procedure = packed` trains the documents' own targets with one step per
chunk; `record` follows #1855's `train_val_ttt_global_sgd_distributed` (`record_stream`,
`_record_sgd_loop`). Then new adapters are built and scoring resumes. Under the evaluation deadline
(ttt_base.Deadline) the phases count as work, and after a fallback no further phase runs.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from pgolf.config import Config, TTTConfig
from pgolf.errors import LegalityError, PgolfError
from pgolf.eval.lora_ttt import LoRATTT
from pgolf.eval.score import autocast_for, global_sgd_attention
from pgolf.eval.trace import EvalStream
from pgolf.eval.ttt_base import all_reduce_grads, cosine_lr
from pgolf.model.gpt import GPT


def pack_docs(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """(inputs, targets, target positions) of the documents, concatenated in the given order."""
    pos = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)] or [np.zeros(0, np.int64)])
    return tokens[pos], tokens[pos + 1], pos


def record_stream(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, bos: int) -> tuple[np.ndarray, ...]:
    """(inputs, targets, target positions) of the record's global-SGD tokens: each document from its BOS
    through the next BOS inclusive (record `_find_docs`), concatenated. Besides the documents' own targets
    that adds one pair per junction, (closing BOS or last token -> the next document's BOS), which no
    validation position holds (position -1; docs/fidelity.md, procedure 18). Its input closes a scored
    document and its target is the BOS id, a constant: it carries nothing unscored, so the ledger is not
    told of it, and a junction whose target is not a BOS (a prefix document before the first BOS) is refused."""
    if (tokens[starts[1:]] != bos).any():
        raise LegalityError("global SGD (record stream): a junction would train on a document's first "
                            "token, which is not a BOS and was never scored")
    idx = np.concatenate([np.arange(s, e + 1) for s, e in zip(starts, ends)])  # (a phase has >= 1 document)
    pos = np.concatenate([np.r_[np.arange(s, e), -1] for s, e in zip(starts, ends)])
    return tokens[idx[:-1]], tokens[idx[1:]], pos[:-1]


def global_sgd(model: GPT, x: np.ndarray, y: np.ndarray, pos: np.ndarray, tc: TTTConfig,
               stream: EvalStream, *, seq_len: int, rank: int = 0, world_size: int = 1) -> int:
    """SGD on every base weight over the packed pairs (x, y); returns the optimizer steps taken."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=tc.global_lr, momentum=tc.global_momentum)
    model.train()
    loop = _record_sgd_loop if tc.global_procedure == "record" else _global_sgd_loop
    with global_sgd_attention(model, seq_len):
        steps = loop(model, x, y, pos, tc, stream, opt, params, seq_len=seq_len, rank=rank, world_size=world_size)
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return steps


def _global_sgd_loop(model, x, y, pos, tc, stream, opt, params, *, seq_len, rank, world_size) -> int:
    device = next(model.parameters()).device
    CT = tc.global_chunk_tokens
    n_chunks = -(-x.size // CT)
    steps = 0
    for _ in range(tc.global_epochs):
        for c in range(n_chunks - 1):  # the last chunk is skipped (#1626)
            lo, hi = c * CT, min((c + 1) * CT, x.size)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(tc.global_lr, c, n_chunks)
            stream.declare_update(pos[lo:hi])
            opt.zero_grad(set_to_none=True)
            rows = list(range(lo, hi, seq_len))
            # each rank a contiguous range of the chunk's sequences (record: my_seq_s .. my_seq_e), so a
            # packed row joins neighbouring text, never sequences another rank's lie between
            rows = rows[len(rows) * rank // world_size:len(rows) * (rank + 1) // world_size]
            for i in range(0, len(rows), tc.global_batch_seqs):
                group = rows[i:i + tc.global_batch_seqs]
                for r0 in sorted({min(seq_len, hi - r) for r in group}):  # full rows, then the short tail
                    sel = [r for r in group if min(seq_len, hi - r) == r0]
                    xb = torch.from_numpy(np.stack([x[r:r + r0] for r in sel])).to(device)  # (b, r0)
                    yb = torch.from_numpy(np.stack([y[r:r + r0] for r in sel])).to(device)
                    if model.max_doc_len > 0:  # varlen: the micro-batch is one packed row
                        xb, yb = xb.view(1, -1), yb.view(1, -1)
                    with autocast_for(device):
                        loss = model(xb, yb, reduction="sum") / (hi - lo)  # mean over the whole chunk
                    loss.backward()
            all_reduce_grads(params)
            if tc.global_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.global_grad_clip)
            opt.step()
            steps += 1
    return steps


def _record_sgd_loop(model, x, y, pos, tc, stream, opt, params, *, seq_len, rank, world_size) -> int:
    """Record #1855 `train_val_ttt_global_sgd_distributed`: of each chunk but the last only its whole
    sequences (the tail is dropped), rank r the contiguous range [n r / W, n (r + 1) / W); per epoch, inside
    the chunk, one step per micro-batch of `global_batch_seqs` sequences on the micro-batch's mean loss,
    the gradient averaged over ranks."""
    device = next(model.parameters()).device
    CT, B = tc.global_chunk_tokens, tc.global_batch_seqs
    n_chunks, n = -(-x.size // CT), CT // seq_len  # a trained chunk holds CT tokens: n whole sequences
    shares = [(n * r // world_size, n * (r + 1) // world_size) for r in range(world_size)]
    # every rank steps as often as the largest share needs (where the record's ranks would wait for each
    # other's all-reduce forever): a rank whose share has run out adds a zero gradient
    most = max(e - s for s, e in shares)
    steps = 0
    for c in range(n_chunks - 1):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(tc.global_lr, c, n_chunks)
        for _ in range(tc.global_epochs):
            for i in range(0, most, B):
                spans = [(c * CT + (s + i) * seq_len, c * CT + min(s + i + B, e) * seq_len) for s, e in shares]
                p = np.concatenate([pos[a:b] for a, b in spans])
                stream.declare_update(p[p >= 0])  # every rank's micro-batch; not the junctions (-1)
                opt.zero_grad(set_to_none=True)
                lo, hi = spans[rank]
                if hi > lo:
                    xb = torch.from_numpy(x[lo:hi]).to(device).view(-1, seq_len)  # (b, seq_len)
                    yb = torch.from_numpy(y[lo:hi]).to(device).view(-1, seq_len)
                    if model.max_doc_len > 0:  # varlen: the micro-batch is one packed row
                        xb, yb = xb.view(1, -1), yb.view(1, -1)
                    with autocast_for(device):
                        loss = model(xb, yb)  # the micro-batch's mean
                    loss.backward()
                all_reduce_grads(params)
                for q in params:  # the record's all-reduce SUM, then * (1 / world_size)
                    if q.grad is not None and world_size > 1:
                        q.grad.mul_(1.0 / world_size)
                if tc.global_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, tc.global_grad_clip)
                opt.step()
                steps += 1
    return steps


class PhasedTTT(LoRATTT):
    name = "phased"
    model: GPT  # (LoRATTT's model) the base weights global_sgd trains

    def __init__(self, model: GPT, val: Any, cfg: Config, stream: EvalStream, **kw):
        super().__init__(copy.deepcopy(model), val, cfg, stream, **kw)  # global SGD trains a copy
        tc = self.tc
        self.queue = np.concatenate(self.batches)  # documents in queue order
        prefix = min(tc.prefix_docs, self.queue.size)
        self.bounds = [prefix * (k + 1) // tc.phases for k in range(tc.phases)]
        for key, rules in (("phase_select", ("queue", "shortest")), ("global_procedure", ("packed", "record"))):
            if getattr(tc, key) not in rules:
                raise PgolfError(f"ttt.{key}: unknown rule {getattr(tc, key)!r} ({' | '.join(rules)})")
        cum = np.cumsum([len(b) for b in self.batches])
        self.fire: dict[int, list[int]] = {}  # batch index -> phases that start after it
        self.fired_after: list[int] = []  # phase k -> the queue batch after which it starts
        for k, bound in enumerate(self.bounds):
            b = int(np.searchsorted(cum, bound))
            self.fired_after.append(b)
            if bound > 0:
                self.fire.setdefault(b, []).append(k)

    def after_batch(self, b: int) -> None:
        if self.deadline.fallback is not None:  # no more adaptation of any kind
            return
        for k in self.fire.get(b, []):
            self.global_phase(k)

    def work_plan(self) -> np.ndarray:
        """The LoRA batches' positions, plus each phase's trained tokens (this rank's share) on the batch
        after which it runs: the deadline is checked before a phase starts, so it counts as what follows."""
        plan = super().work_plan()
        for b, ks in self.fire.items():
            for k in ks:
                tokens = self.docs.lengths[self.phase_docs(k)].sum() * self.tc.global_epochs
                plan[min(b + 1, plan.size - 1)] += tokens / self.world_size
        return plan

    def phase_docs(self, k: int) -> np.ndarray:
        """The `bounds[k]` documents phase k trains on (cumulative), by `ttt.phase_select`."""
        if self.tc.phase_select == "queue":
            return self.queue[:self.bounds[k]]
        # the scored documents by (length-sorted batch index, position in batch): the batches were cut
        # from the documents sorted stably by length, so that is the order of (length, document index)
        scored = np.concatenate(self.batches[:self.fired_after[k] + 1])
        return scored[np.lexsort((scored, self.docs.lengths[scored]))][:self.bounds[k]]

    def global_phase(self, k: int) -> None:
        t0 = time.perf_counter()
        self.stream.sync_scored()  # the documents other ranks scored count as scored
        docs = self.phase_docs(k)
        starts, ends = self.docs.starts[docs], self.docs.ends[docs]
        x, y, pos = record_stream(self.tokens, starts, ends, self.cfg.data.bos_id) \
            if self.tc.global_procedure == "record" else pack_docs(self.tokens, starts, ends)
        steps = global_sgd(self.model, x, y, pos, self.tc, self.stream, seq_len=self.tc.eval_seq_len,
                           rank=self.rank, world_size=self.world_size)
        self.lora = self.new_lora()  # fresh adapters on the adapted base
        self.phase = k + 1
        dt = time.perf_counter() - t0
        self.ledger.add(f"phase_{k + 1}", dt)
        if self.log is not None:
            self.log.phase(k + 1, docs=int(docs.size), trained_tokens=int(x.size), sgd_steps=steps,
                           phase_seconds=round(dt, 4))
