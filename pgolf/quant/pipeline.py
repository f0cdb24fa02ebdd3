"""`pgolf quantize RUN`: weights -> Hessians -> GPTQ/RTN (+LQER) -> compressed artifact -> accounting
-> the artifact alone re-scored (docs/records/record-stack.md §4.1). Every phase is timed into result.json.

The artifact counts as `model_bytes` (its size on disk) + `code_bytes` (pgolf.script.codebytes:
the exported record script, minified and wrapped) = `total_bytes`
against `quant.limit_bytes` (16,000,000). Over the limit is an error with `strict`, otherwise a loud
warning on stderr and `under_limit: false` in the result, never a silent pass.

Nothing in the run directory changes until the pipeline has succeeded: the config, result.json, the
weights and every setting are read and checked first; the artifact is quantised, measured and scored
from its bytes in memory; only then are the artifact (its own name, `artifact_name`: never the
trainer's export), the result.json update (flat keys + new stages), the train.log lines and the
Hessian cache written, with SIGINT/SIGTERM held back until all four are. An interrupt, an error or
`--strict` over the limit leaves the run directory byte-identical.

The new artifact replaces the run's `artifact`, so the flat scores of the old one are cleared
(`pgolf.runs.replaced_artifact`; their values go into the new stage, under `replaced`): unscored
(`--no-eval`), the run's `val_bpb` is the trainer's again, never the old artifact's beside the new bytes.
A score over fewer validation tokens than the run's `val_tokens` (`--set data.val_max_tokens=N`) is kept
as `quant_val_bpb` / `quant_val_tokens` only: the run's `val_bpb` is never a subset's score.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgolf.artifact.qstate import load_artifact, serialize
from pgolf.artifact.weights import load_weights
from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.fileio import signals_deferred
from pgolf.model import build_with_state
from pgolf.quant import quantize as A
from pgolf.runs import (MOVED_DATA, check_moved_data, check_overrides, open_run, replaced_artifact, resolve, setting,
                        stage)

WEIGHTS = "final_model.pt"
TRAINER_EXPORT = "final_model.int8.ptz"  # `pgolf train`'s artifact: quantize never writes it
SECTIONS = ("quant.", "eval.", "data.val_max_tokens", *MOVED_DATA)  # what --set may change: never the model


def artifact_name(method: str) -> str:
    """`final_model.<method>.ptz`, except that method int8 (the trainer's own format) is written as
    `final_model.int8q.ptz` so it never replaces the trainer's export."""
    name = f"final_model.{method}.ptz"
    return "final_model.int8q.ptz" if name == TRAINER_EXPORT else name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Prepared:
    """A run loaded for quantisation: config, trained weights, validation set, Hessians, scores."""
    run: Any
    cfg: Config
    state: dict[str, torch.Tensor]
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)
    val: Any = None
    hessians: dict[str, torch.Tensor] | None = None
    hessian_info: dict[str, Any] = field(default_factory=dict)
    prequant: dict[str, Any] | None = None


def _timed(timings: dict[str, float], key: str, t0: float) -> None:
    timings[key] = round(time.perf_counter() - t0, 3)


def prepare(run_dir: str | Path, overrides: list[str] | None = None, *, device=None,
            evaluate: bool = True, hessians: bool | None = None, cache: bool = True) -> Prepared:
    """Load a run; Hessians when GPTQ needs them (cached in the run dir; with cache=False computed
    ones are left for the caller to store); the pre-quantisation score."""
    from pgolf.quant.hessian import cached_hessians

    t0 = time.perf_counter()
    run = resolve(run_dir)
    cfg = Config.load(run.file("config.json")).with_overrides(overrides)
    check_moved_data(run, cfg, overrides or [])
    A.validate(cfg.quant)  # a bad setting fails before calibration and the pre-quantisation score
    device = torch.device(device) if device else default_device()
    wpath = run.file(WEIGHTS)
    if not wpath.exists():
        raise PgolfError(f"{wpath}: not found (quantize needs the trained weights the trainer saves)")
    state = load_weights(wpath)
    p = Prepared(run=run, cfg=cfg, state=state, device=device)
    _timed(p.timings, "load_s", t0)
    if hessians if hessians is not None else cfg.quant.method == "gptq":
        t0 = time.perf_counter()
        p.hessians, p.hessian_info = cached_hessians(run.path, lambda: build_with_state(cfg, state, device), cfg,
                                                     WEIGHTS, write=cache)
        _timed(p.timings, "hessians_s", t0)
    if evaluate:
        p.val = load_val(cfg)
        p.prequant = _prequant(p)
    return p


def load_val(cfg: Config):
    from pgolf.eval.bpb import load_val as _load_val

    return _load_val(cfg.data.path, cfg.data.tokenizer or None, cfg.model.vocab_size, eval_seq_len(cfg),
                     max_tokens=cfg.quant.eval_max_tokens or cfg.data.val_max_tokens, bos_id=cfg.data.bos_id)


def eval_seq_len(cfg: Config) -> int:
    return cfg.eval.seq_len or cfg.train.eval_seq_len


def scoring_setting(cfg: Config) -> str:
    """How `score` windows the validation set, as recorded beside every score it writes."""
    return setting(eval_seq_len(cfg), cfg.eval.stride, cfg.eval.doc_mask or cfg.model.doc_mask)


def score(cfg: Config, state: dict[str, torch.Tensor], val, device) -> dict[str, Any]:
    """The run's evaluation setting (`eval.stride`, `eval.doc_mask`, as `pgolf eval` without TTT),
    so quantised and unquantised scores compare like for like with the eval command's."""
    from pgolf.eval.score import score_stream

    return score_stream(build_with_state(cfg, state, device), val, eval_seq_len(cfg), cfg.eval.stride,
                        cfg.eval.batch_seqs, doc_mask=cfg.eval.doc_mask, bos_id=cfg.data.bos_id)


def _prequant(p: Prepared) -> dict[str, Any]:
    """The unquantised model's score on the same validation tokens (reused from result.json if there)."""
    res, n = p.run.result(), p.val.num_targets
    if (res.get("val_bpb_prequant") is not None and res.get("val_tokens_prequant") == n
            and res.get("val_scoring") == scoring_setting(p.cfg)):
        return {"val_bpb": res["val_bpb_prequant"], "val_loss": res.get("val_loss_prequant"), "reused": True}
    t0 = time.perf_counter()
    out = score(p.cfg, p.state, p.val, p.device)
    _timed(p.timings, "eval_prequant_s", t0)
    return out


def quantize_state(p: Prepared, q=None) -> tuple[bytes, dict, dict, dict]:
    """Quantise + serialise in memory: (artifact bytes, qstate, info, stream sizes)."""
    q = q or p.cfg.quant
    t0 = time.perf_counter()
    qstate, info = A.quantize_state_dict(p.state, q, p.hessians, p.device)
    _timed(p.timings, "quantize_s", t0)
    t0 = time.perf_counter()
    blob, streams = serialize(qstate, q)
    _timed(p.timings, "serialize_s", t0)
    return blob, qstate, info, streams


def warn_over_limit(total: int, limit: int, model_bytes: int, code: int, artifact: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: ARTIFACT OVER THE {limit:,}-BYTE LIMIT\n"
          f"  {artifact}: total {total:,} B = model {model_bytes:,} B + code {code:,} B\n"
          f"  over by {total - limit:,} B; this is NOT a valid submission (use --strict to fail)\n{bar}\n",
          file=sys.stderr, flush=True)


def say(notes: list[str], msg: str) -> None:
    """Progress on stderr now; `notes` go to train.log when the results are published."""
    notes.append(msg)
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def quantize_run(run_dir: str | Path, overrides: list[str] | None = None, strict: bool = False, *,
                 evaluate: bool = True, device=None, allow_unfinished: bool = False) -> dict[str, Any]:
    """The whole `pgolf quantize` pipeline; publishes its results into the run (module notes) and
    returns them."""
    from pgolf.script.codebytes import code_bytes

    t_start = time.perf_counter()
    check_overrides(overrides or [], SECTIONS, "quantize")
    run, prev = open_run(run_dir, "quantize", allow_unfinished)
    p = prepare(run.path, overrides, device=device, evaluate=evaluate, cache=False)
    cfg, q = p.cfg, p.cfg.quant
    notes: list[str] = []
    blob, qstate, info, streams = quantize_state(p)
    name = artifact_name(q.method)
    t0 = time.perf_counter()
    code = code_bytes(cfg)
    _timed(p.timings, "code_bytes_s", t0)
    model_bytes = len(blob)  # exactly what the file will hold
    total = model_bytes + code["code_bytes"]
    report = A.byte_report(qstate, blob, streams)
    out: dict[str, Any] = {
        "artifact": str(run.file(name)), "model_bytes": model_bytes, "code_bytes": code["code_bytes"],
        "code_bytes_raw": code["code_bytes_raw"], "code_bytes_minified": code["code_bytes_minified"],
        "code_files": code["code_files"], "total_bytes": total, "limit": q.limit_bytes,
        "margin": q.limit_bytes - total, "under_limit": total <= q.limit_bytes,
        "quant_method": q.method, "compressor": q.compressor,
        "group_codec": q.group_codec if q.compressor == "pergroup" else None,
        "bytes_by_group": report["bytes_by_group"], "params_by_group": report["params_by_group"],
        "bits_per_param": report["bits_per_param"], "bits_per_param_by_group": report["bits_per_param_by_group"],
        "lqer_tensors": [x["name"] for x in info["lqer"]],
        "quant_methods": sorted({v["method"] for v in info["tensors"].values()}),
        "calibration": {k: v for k, v in p.hessian_info.items()},
    }
    if not out["under_limit"]:
        if strict:  # before anything is written
            raise PgolfError(f"{name}: total {total:,} bytes (model {model_bytes:,} + code {code['code_bytes']:,}) "
                             f"is over the {q.limit_bytes:,}-byte limit by {total - q.limit_bytes:,} (--strict)")
        warn_over_limit(total, q.limit_bytes, model_bytes, code["code_bytes"], name)
    src = p.hessian_info.get("cached")
    say(notes, f"quantize: {q.method} ({', '.join(out['quant_methods'])}), Hessians "
               f"{'-' if src is None else 'cached' if src else 'computed'}; {name}: {model_bytes:,} B model + "
               f"{code['code_bytes']:,} B code = {total:,} B ({out['bits_per_param']:.2f} bits/param)")
    out["val_bpb_prequant"] = out["val_bpb"] = out["quant_val_bpb"] = None
    res = None
    if evaluate:
        assert p.prequant is not None  # prepare(evaluate=True) scored the unquantised weights
        t0 = time.perf_counter()
        state = load_artifact(blob, name)  # the artifact's bytes alone: decompress -> dequantise
        _timed(p.timings, "load_artifact_s", t0)
        t0 = time.perf_counter()
        res = score(cfg, state, p.val, p.device)
        _timed(p.timings, "eval_quant_s", t0)
        say(notes, f"quantize: val_bpb {p.prequant['val_bpb']:.4f} unquantised -> {res['val_bpb']:.4f} "
                   f"from {name} alone")
        out.update(val_bpb_prequant=p.prequant["val_bpb"], val_loss_prequant=p.prequant.get("val_loss"),
                   val_tokens_prequant=p.val.num_targets, val_scoring=scoring_setting(cfg),
                   val_bpb=res["val_bpb"], quant_val_bpb=res["val_bpb"], quant_val_tokens=res["tokens"],
                   val_loss=res["val_loss"], quant_delta_bpb=res["val_bpb"] - p.prequant["val_bpb"])
    _timed(p.timings, "total_s", t_start)
    out["quant_timings"] = p.timings
    updates = {**out, "artifact": name}  # as the trainer writes it: the file's name in the run folder
    out["val_tokens"] = prev.get("val_tokens")  # the run's: what its val_bpb was scored on
    headline = evaluate and res is not None and res["tokens"] >= (prev.get("val_tokens") or 0)
    if not evaluate:  # the scores of final_model.pt still hold; those of the replaced artifact do not
        for k in ("val_bpb", "val_bpb_prequant", "quant_val_bpb"):
            updates.pop(k)
    elif not headline:  # fewer tokens than the run's val_bpb (data.val_max_tokens): a quant_* score only
        del updates["val_bpb"], updates["val_loss"]
        say(notes, f"quantize: scored {out['quant_val_tokens']:,} of the run's {prev['val_tokens']:,} validation "
                   f"tokens, so val_bpb stays the run's; this score is quant_val_bpb")
    elif prev.get("val_bpb") is not None and "val_bpb_train" not in prev:
        updates["val_bpb_train"] = prev["val_bpb"]  # the trainer's (unquantised) score, kept once
    sha = hashlib.sha256(blob).hexdigest()
    cleared, replaced = replaced_artifact(prev, sha)  # the old artifact's flat scores move into the new stage
    updates = {**cleared, **updates}
    was = {"replaced": {"artifact": prev.get("artifact") and Path(prev["artifact"]).name, "scores": replaced}
           } if replaced else {}
    new = [stage("pre-quant", p.prequant, by="quantize", weights="fp", artifact=WEIGHTS, setting=scoring_setting(cfg))
           ] if evaluate and p.prequant is not None and not p.prequant.get("reused") else []
    new.append(stage("quantised", res, by="quantize", weights="artifact", artifact=name, method=q.method,
                     setting=scoring_setting(cfg) if evaluate else None,
                     artifact_sha256=sha, model_bytes=model_bytes, total_bytes=total,
                     under_limit=out["under_limit"], **was))
    _publish(p, name, blob, updates, new, notes)
    return out


def _publish(p: Prepared, name: str, blob: bytes, updates: dict[str, Any], new_stages: list[dict],
             notes: list[str]) -> None:
    """The only writes `pgolf quantize` makes, together, with SIGINT/SIGTERM held until all are done."""
    from pgolf.quant.hessian import write_cache

    with signals_deferred():
        p.run.write_bytes(name, blob)  # atomic: temporary file + rename
        p.run.update_result(updates, new_stages)
        for msg in notes:
            p.run.log(msg, echo=False)
        if p.hessians is not None and p.hessian_info.get("cached") is False:
            write_cache(p.run.path, p.cfg, p.hessians, p.hessian_info, WEIGHTS)


# val_bpb: the artifact's score (the contract's); quant_val_tokens: on how many tokens, against the run's val_tokens
CLI_KEYS = ("artifact", "model_bytes", "code_bytes", "total_bytes", "limit", "under_limit",
            "val_bpb_prequant", "val_bpb", "quant_val_tokens", "val_tokens")
