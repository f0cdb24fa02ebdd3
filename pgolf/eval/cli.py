"""`pgolf eval RUN_DIR [--artifact PATH] [--ttt] [--trace FILE.npz] [--set k=v]`.

Loads the run's config, the weights (the artifact when given, else `final_model.pt`) and the
validation split; scores it once without TTT and, with `--ttt`, once more with `ttt.method`. Writes
the convergence record to `RUN_DIR/ttt.jsonl`, the per-token trace to FILE.npz (the evaluation that
gives `val_bpb`), and merges the results into `result.json`. Runs under torchrun as well (scoring
sums all-reduced; documents / chunks split across ranks deterministically).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.runs import RunDir, resolve

EVAL_SECTIONS = ("eval.", "ttt.", "data.val_max_tokens")  # what --set may change at evaluation time


def load_model(run: RunDir, cfg: Config, artifact: str | None, device: torch.device) -> tuple[torch.nn.Module, Path]:
    """The run's model with the weights (`final_model.pt`, or the artifact) loaded, looping on as
    evaluated, in eval mode."""
    from pgolf.artifact.weights import load_weights
    from pgolf.model import build_with_state

    path = Path(artifact) if artifact else run.file("final_model.pt")
    return build_with_state(cfg, load_weights(path), device, str(path)).eval(), path


def _gather_losses(losses: np.ndarray, device: torch.device) -> np.ndarray:
    """Per-position losses from every rank (each position was scored on one rank)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return losses
    t = torch.from_numpy(np.nan_to_num(losses, nan=0.0)).to(device)
    dist.all_reduce(t)
    return t.cpu().numpy()


def cmd_eval(args: Any) -> dict[str, Any]:
    from pgolf.distributed import setup, teardown
    from pgolf.eval.bpb import load_val
    from pgolf.eval.score import score_stream
    from pgolf.eval.trace import EvalStream, find_docs, trace_path
    from pgolf.eval.ttt import method_label, run_ttt, runner_for
    from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger, warmup

    for item in args.overrides:
        if not item.split("=", 1)[0].strip().startswith(EVAL_SECTIONS):
            raise PgolfError(f"--set {item}: only eval.*, ttt.* and data.val_max_tokens change at evaluation "
                             "time (the model is fixed by the run)")
    run = resolve(args.run_dir)
    cfg = Config.load(run.file("config.json")).with_overrides(args.overrides)
    if args.ttt:
        runner_for(cfg)  # an unknown ttt.method fails before anything is loaded
    ledger = TimeLedger(cfg.eval.max_seconds)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = setup()

    def say(msg: str) -> None:  # progress on stderr, rank 0 (the CLI contract)
        if ctx.is_main:
            print(f"{time.strftime('%H:%M:%S')} eval: {msg}", file=sys.stderr, flush=True)

    try:
        with ledger.phase("load"):
            model, artifact = load_model(run, cfg, args.artifact, ctx.device)
            seq_len = cfg.eval.seq_len or cfg.train.eval_seq_len
            val = load_val(cfg.data.path, cfg.data.tokenizer or None, cfg.model.vocab_size, seq_len,
                           cfg.data.val_max_tokens, bos_id=cfg.data.bos_id)
        n, docs = val.num_targets, find_docs(val.tokens, cfg.data.bos_id)
        say(f"loaded {artifact.name} and {n:,} validation targets in {ledger.seconds['load']:.1f} s")
        want_trace = bool(args.trace)
        base_stream = EvalStream(n, docs=docs, keep_trace=want_trace and not args.ttt, keep_losses=args.ttt,
                                 method="none")
        with ledger.phase("score"):
            base = score_stream(model, val, seq_len, cfg.eval.stride, cfg.eval.batch_seqs, rank=ctx.rank,
                                world_size=ctx.world_size, doc_mask=cfg.eval.doc_mask, stream=base_stream)
        base_stream.finish()
        say(f"val_bpb {base['val_bpb']:.4f} without TTT ({ledger.seconds['score']:.1f} s)")
        final, stream = base, base_stream
        out: dict[str, Any] = {"run_dir": str(run.path), "artifact": str(artifact), "ttt": bool(args.ttt)}
        if args.ttt:
            method = method_label(cfg)
            with ledger.phase("warmup"):  # synthetic tokens only
                warmup(model, cfg, lora=cfg.ttt.method == "lora",
                       base=cfg.ttt.method != "lora" or cfg.ttt.phases > 0)
            stream = EvalStream(n, docs=docs, keep_trace=want_trace, method=method)
            log = ConvergenceLog(run.file("ttt.jsonl") if ctx.is_main else None, stream, method=method,
                                 baseline=_gather_losses(base_stream.losses, ctx.device),
                                 eval_id=time.strftime("%Y%m%d-%H%M%S"), label=artifact.name,
                                 echo=say if ctx.is_main else None)
            say(f"{method}: warm-up {ledger.seconds['warmup']:.1f} s, scoring with test-time training")
            with ledger.phase("ttt"):
                final = run_ttt(model, val, cfg, stream, log=log, ledger=ledger, rank=ctx.rank,
                                world_size=ctx.world_size)
            out.update({"method": method, "updates": final["updates"], "val_bpb_no_ttt": base["val_bpb"],
                        "val_loss_no_ttt": base["val_loss"], "ttt_log": str(run.file("ttt.jsonl")),
                        "ttt_fallback": final["ttt_fallback"]})
        timed = "ttt" if args.ttt else "score"
        out.update({"val_bpb": final["val_bpb"], "val_loss": final["val_loss"], "scored_tokens": final["tokens"],
                    "scored_bytes": final["bytes"], "val_targets": n,
                    "eval_seconds": round(ledger.seconds[timed], 3), "time": ledger.as_dict(timed)})
        if want_trace:
            tr = stream.trace()
            tr.save(trace_path(args.trace, ctx.rank, ctx.world_size))
            out.update({"trace": str(args.trace), "trace_entries": len(tr)})  # this rank's entries
        if ctx.is_main and run.is_finished():
            prefix = "ttt_" if args.ttt else "eval_"
            upd = {f"{prefix}val_bpb": out["val_bpb"], f"{prefix}val_loss": out["val_loss"],
                   f"{prefix}eval_seconds": out["eval_seconds"], f"{prefix}artifact": str(artifact)}
            if args.ttt:
                upd.update({"ttt_method": out["method"], "ttt_val_bpb_no_ttt": base["val_bpb"],
                            "ttt_updates": out["updates"], "ttt_fallback": out["ttt_fallback"]})
            run.update_result(upd)
        return out
    finally:
        if owns_group and ctx.backend is not None:
            teardown()
