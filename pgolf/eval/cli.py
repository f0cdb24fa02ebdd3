"""`pgolf eval RUN_DIR [--artifact PATH | --weights fp] [--ttt] [--trace FILE.npz] [--set k=v]`.

Loads the run's config, the weights and the validation split; scores it once without TTT and, with
`--ttt`, once more with `ttt.method`. The weights are an artifact, as a submission is scored: the run's
latest (`artifact` in result.json: the last `pgolf quantize`'s, else the trainer's export), or the one
`--artifact` names; `--weights fp` scores the unquantised `final_model.pt` instead. The JSON says which
file was scored. Writes the convergence record to `RUN_DIR/ttt.jsonl` (an evaluation is complete once
its `done` row is there), the per-token trace to FILE.npz (the evaluation that gives `val_bpb`; its
path is checked before anything is scored), and merges the results and their stages into
`result.json` at the end. Runs under torchrun as well (scoring sums all-reduced; documents / chunks
split across ranks deterministically).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.fileio import check_output, signals_deferred
from pgolf.runs import MOVED_DATA, RunDir, artifact_stage, check_moved_data, check_overrides, open_run, setting, stage

if TYPE_CHECKING:
    from pgolf.model.gpt import GPT

EVAL_SECTIONS = ("eval.", "ttt.", "data.val_max_tokens", *MOVED_DATA)  # what --set may change at evaluation time
WEIGHTS = "final_model.pt"


def weights_path(run: RunDir, result: dict[str, Any], artifact: str | None, weights: str | None) -> Path:
    """What `pgolf eval` scores: `--artifact`, `--weights fp` (final_model.pt), else the run's latest
    artifact. Artifacts live in the run directory, so a recorded path is looked up there by name."""
    if artifact and weights == "fp":
        raise PgolfError("--artifact / --weights fp: give one (an artifact to score, or the unquantised weights)")
    if artifact:
        return Path(artifact)
    if weights == "fp":
        return run.file(WEIGHTS)
    if not result.get("artifact"):
        flag = "" if result.get("status") == "finished" else " --allow-unfinished"  # quantize refuses it otherwise
        raise PgolfError(f"{run.file('result.json')}: names no artifact (the trainer exported none and the run was "
                         f"never quantised): run `pgolf quantize {run.path}{flag}` or score --weights fp")
    return run.file(Path(result["artifact"]).name)


def load_model(run: RunDir, cfg: Config, artifact: str | None, device: torch.device) -> tuple[GPT, Path]:
    """The run's model with the weights (`final_model.pt`, or the artifact) loaded, looping on as
    evaluated, in eval mode."""
    from pgolf.artifact.weights import load_weights
    from pgolf.model import build_with_state

    path = Path(artifact) if artifact else run.file(WEIGHTS)
    return build_with_state(cfg, load_weights(path), device, str(path)).eval(), path


def _gather_losses(losses: np.ndarray, device: torch.device) -> np.ndarray:
    """Per-position losses from every rank (each position was scored on one rank); NaN where no rank
    scored it (the tail that packed validation rows drop)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return losses
    scored = np.isfinite(losses)
    t = torch.from_numpy(np.stack([np.where(scored, losses, 0.0), scored]).astype(np.float64)).to(device)
    dist.all_reduce(t)
    total, count = t.cpu().numpy()
    return np.where(count > 0, total, np.nan)


def cmd_eval(args: Any) -> dict[str, Any]:
    from pgolf.distributed import setup, teardown
    from pgolf.eval.bpb import load_val
    from pgolf.eval.score import score_stream
    from pgolf.eval.trace import EvalStream, find_docs, trace_path
    from pgolf.eval.ttt import method_label, run_ttt, runner_for
    from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger, warmup

    check_overrides(args.overrides, EVAL_SECTIONS, "eval")
    run, result = open_run(args.run_dir, "eval", args.allow_unfinished)
    cfg = Config.load(run.file("config.json")).with_overrides(args.overrides)
    check_moved_data(run, cfg, args.overrides)
    if args.ttt:
        runner_for(cfg)  # an unknown ttt.method fails before anything is loaded
    path = weights_path(run, result, args.artifact, args.weights)
    ledger = TimeLedger(cfg.eval.max_seconds)
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = setup()
    if args.trace:  # before any work: a bad path fails now, not after the evaluation
        check_output(trace_path(args.trace, ctx.rank, ctx.world_size), "--trace")

    def say(msg: str) -> None:  # progress on stderr, rank 0 (the CLI contract)
        if ctx.is_main:
            print(f"{time.strftime('%H:%M:%S')} eval: {msg}", file=sys.stderr, flush=True)

    try:
        with ledger.phase("load"):
            model, artifact = load_model(run, cfg, str(path), ctx.device)
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
        out: dict[str, Any] = {"run_dir": str(run.path), "artifact": str(artifact), "ttt": bool(args.ttt),
                               "weights": "fp" if artifact.suffix == ".pt" else "artifact"}  # as load_weights reads it
        if args.ttt:
            method = method_label(cfg)
            with ledger.phase("warmup"):  # synthetic tokens only
                warmup(model, cfg, lora=cfg.ttt.method == "lora",
                       base=cfg.ttt.method != "lora" or cfg.ttt.phases > 0)
            stream = EvalStream(n, docs=docs, keep_trace=want_trace, method=method)
            assert base_stream.losses is not None  # kept for the TTT baseline (keep_losses=args.ttt)
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
        with signals_deferred():  # the outputs appear together
            if want_trace:
                tr = stream.trace()
                tr.save(trace_path(args.trace, ctx.rank, ctx.world_size))
                out.update({"trace": str(args.trace), "trace_entries": len(tr)})  # this rank's entries
            if ctx.is_main and run.is_finished():
                _record(run, cfg, out, base, artifact)
        return out
    finally:
        if owns_group and ctx.backend is not None:
            teardown()


def _record(run: RunDir, cfg: Config, out: dict[str, Any], base: dict[str, Any], artifact: Path) -> None:
    """Merge an evaluation into result.json: flat keys (`eval_*` / `ttt_*`, the latest of each) and
    its stages (the score without TTT and, with TTT, the adapted one)."""
    fp = out["weights"] == "fp"

    def record(name: str, score: dict[str, Any], **fields: Any) -> dict[str, Any]:
        if fp:
            return stage(name, score, by="eval", weights="fp", artifact=artifact.name, **fields)
        return artifact_stage(name, score, artifact, run.path, by="eval", **fields)

    scoring = setting(cfg.eval.seq_len or cfg.train.eval_seq_len, cfg.eval.stride,
                      cfg.eval.doc_mask or cfg.model.doc_mask)
    new = [record("pre-quant" if fp else "quantised", base, setting=scoring)]
    prefix = "ttt_" if out["ttt"] else "eval_"
    upd = {f"{prefix}val_bpb": out["val_bpb"], f"{prefix}val_loss": out["val_loss"],
           f"{prefix}val_tokens": out["scored_tokens"], f"{prefix}eval_seconds": out["eval_seconds"],
           f"{prefix}artifact": str(artifact), f"{prefix}weights": out["weights"]}
    if out["ttt"]:
        upd.update({"ttt_method": out["method"], "ttt_val_bpb_no_ttt": base["val_bpb"], "ttt_updates": out["updates"],
                    "ttt_fallback": out.get("ttt_fallback")})
        new.append(record("ttt", {"val_bpb": out["val_bpb"], "val_loss": out["val_loss"],
                                  "tokens": out["scored_tokens"], "bytes": out["scored_bytes"]},
                          method=out["method"], setting=f"seq_len={cfg.ttt.eval_seq_len} (test-time training)",
                          updates=out["updates"], fallback=out.get("ttt_fallback")))
        prev = run.result()
        headline = prev.get("quant_val_tokens") or prev.get("artifact_val_tokens") or prev.get("val_tokens") or 0
        if not fp and artifact.name == Path(prev.get("artifact") or "").name and out["scored_tokens"] >= headline:
            # the run's own artifact adapted over all the tokens its headline scored: the score a record
            # reports becomes the run's val_bpb (the score without TTT stays quant_val_bpb)
            upd.update(val_bpb=out["val_bpb"], val_loss=out["val_loss"])
            if "val_bpb_train" not in prev:  # never quantised: val_bpb was the trainer's, kept once (as quantize)
                upd["val_bpb_train"] = prev.get("val_bpb")
    run.update_result(upd, new)
