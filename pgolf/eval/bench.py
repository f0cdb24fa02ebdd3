"""`pgolf bench --ttt`: scored tokens per second of a TTT method, on synthetic documents.

The stream is random token ids (never validation data) cut into documents whose lengths follow a
log-normal with the challenge's mean (~810 SP8192 tokens per document over the 50,000 validation
documents; docs/records/record-stack.md §1.2), so per-document LoRA batching, chunking and phases run at
realistic shapes. The scores mean nothing; the seconds do. The method runs exactly as `pgolf eval
--ttt` runs it (warm-up, then `run_ttt` through an EvalStream), under torchrun too.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pgolf.config import Config
from pgolf.errors import PgolfError

if TYPE_CHECKING:
    from pgolf.model.gpt import GPT

MEAN_DOC_TOKENS = 810


def synthetic_val(n_tokens: int, vocab_size: int, *, mean_doc: int = MEAN_DOC_TOKENS, bos_id: int = 1,
                  seed: int = 0):
    """A ValSet of `n_tokens` targets: BOS-led documents of random ids (>= 8, no specials) and 1-6 bytes each."""
    from pgolf.eval.bpb import ValSet

    if n_tokens < 2:
        raise PgolfError(f"--tokens {n_tokens}: need at least 2")
    g = np.random.default_rng(seed)
    tokens = g.integers(8, vocab_size, size=n_tokens + 1)
    sigma = 1.0
    pos = 0
    while pos <= n_tokens:
        tokens[pos] = bos_id
        pos += max(2, int(g.lognormal(np.log(mean_doc) - sigma ** 2 / 2, sigma)))
    t = torch.from_numpy(tokens.astype(np.int64))
    nbytes = torch.from_numpy(np.where(tokens[1:] == bos_id, 0, g.integers(1, 7, size=n_tokens)).astype(np.int16))
    return ValSet(tokens=t, bytes=nbytes, doc_starts=torch.nonzero(t == bos_id).flatten(), byte_source="lut")


def bench_model(cfg: Config, run_dir: str | None, device: torch.device) -> GPT:
    """The run's trained weights (as `pgolf eval` loads them), else the preset's initialisation;
    looping as evaluated, eval mode."""
    if run_dir is not None:
        from pgolf.eval.cli import load_model
        from pgolf.runs import resolve

        return load_model(resolve(run_dir), cfg, None, device)[0]
    from pgolf.model import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device)
    model.looping = bool(cfg.model.num_loops)
    return model.eval()


def bench_ttt(cfg: Config, *, tokens: int, run_dir: str | None = None) -> dict[str, Any]:
    from pgolf import distributed
    from pgolf.eval.trace import EvalStream, find_docs
    from pgolf.eval.ttt import method_label, run_ttt, runner_for
    from pgolf.eval.ttt_base import TimeLedger, warmup

    runner_for(cfg)  # an unknown method fails before any work
    ctx = distributed.setup()
    try:
        model = bench_model(cfg, run_dir, ctx.device)
        val = synthetic_val(tokens, cfg.model.vocab_size, bos_id=cfg.data.bos_id)
        ledger = TimeLedger(cfg.eval.max_seconds)
        method = method_label(cfg)
        with ledger.phase("warmup"):
            warmup(model, cfg, lora=cfg.ttt.method == "lora", base=cfg.ttt.method != "lora" or cfg.ttt.phases > 0)
        stream = EvalStream(val.num_targets, docs=find_docs(val.tokens, cfg.data.bos_id), method=method)
        with ledger.phase("ttt"):
            res = run_ttt(model, val, cfg, stream, ledger=ledger, rank=ctx.rank, world_size=ctx.world_size)
    finally:
        distributed.teardown()
    secs = ledger.seconds["ttt"]
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    per_rank = round(val.num_targets / secs / ctx.world_size)
    return {"device": name, "preset": cfg.preset, "method": method, "weights": "trained" if run_dir else "init",
            "world_size": ctx.world_size, "targets": val.num_targets, "documents": int(val.doc_starts.numel()),
            "updates": res["updates"], "warmup_s": round(ledger.seconds["warmup"], 3), "ttt_s": round(secs, 3),
            "scored_tokens_per_s": round(val.num_targets / secs),
            "scored_tokens_per_s_per_rank": per_rank,
            # a GPU figure only where GPUs ran it (plan_vs_bench puts it beside `pgolf plan`'s prediction)
            "scored_tokens_per_s_per_gpu": per_rank if ctx.device.type == "cuda" else None,
            "time": ledger.as_dict("ttt")}
