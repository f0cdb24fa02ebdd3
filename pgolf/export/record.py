"""The record pipeline: what an exported `train_gpt.py` runs, as ordinary pgolf code.

One process tree (`torchrun --nproc_per_node=N` shards it as pgolf.train does):
1. the configuration, with the official script's environment overrides (DATA_PATH, TOKENIZER_PATH,
   SEED, RUN_ID, ITERATIONS, MAX_WALLCLOCK_SECONDS; 0 = no wall-clock cap);
2. training under the wall clock with pgolf.train's Trainer (the loop stops `train.gptq_reserve_seconds`
   early), the EMA weights applied, the pre-quantisation score (as `pgolf train`);
3. GPTQ calibration on training data inside that reserve, timed against it, then quantisation and
   compression on rank 0, and the artifact written (as `pgolf quantize`);
4. the artifact read back alone and scored, then scored once more with the configuration's TTT after
   a warm-up on random tokens (as `pgolf eval --ttt`), keeping the per-token trace for audits;
5. the records' log lines, a pgolf run folder (`runs/RUN_ID`: train.log, config.json, result.json,
   final_model.pt, the artifact, trace.npz, ttt.jsonl, train_gpt.py) and one JSON line last on stdout.

`python -m pgolf.export.record (--preset P | --config C) [--seed S] [--out DIR] [--set k=v]` runs it
from pgolf (the run joins runs/index.jsonl, and its result.json records each score as a stage). The
exported script is this module's `main` with the configuration baked in (pgolf.script.bundle), so both
run the same code. In result.json, as on the JSON line, `val_bpb` / `val_loss` are the score with TTT.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pgolf import distributed
from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write_bytes, atomic_write_json
from pgolf.model.gpt import GPT
from pgolf.train import Trainer

# The official script's environment overrides -> (section, field, least value: the field's domain in
# pgolf.config_domains, which the script does not carry)
ENV = {"DATA_PATH": ("data", "path", None), "TOKENIZER_PATH": ("data", "tokenizer", None),
       "SEED": ("train", "seed", 0), "ITERATIONS": ("train", "iterations", 1),
       "MAX_WALLCLOCK_SECONDS": ("train", "max_seconds", 0)}
TRAINER_STEP_LINE = re.compile(r"step \d+ (loss|val_loss) ")  # pgolf's own step lines; metric() logs them


def apply_env(cfg: Config, environ) -> Config:
    """`cfg` with the environment overrides applied, each value typed as its field and in its domain."""
    for var, (section, key, least) in ENV.items():
        if var in environ:
            sec = getattr(cfg, section)
            kind = type(getattr(sec, key))
            try:
                value = kind(environ[var])
                ok = least is None or least <= value < math.inf  # NaN fails too
            except ValueError:
                ok = False
            if not ok:
                raise PgolfError(f"{var}={environ[var]!r}: expected {kind.__name__}"
                                 f"{'' if least is None else f' >= {least}'} ({section}.{key})")
            setattr(sec, key, value)
    return cfg


def run_name(cfg: Config, environ) -> str:
    """RUN_ID (a folder name under runs/, not a path), or a new one from the time, preset and seed."""
    name = environ.get("RUN_ID") or default_run_id(cfg)
    if name == ".." or Path(name).name != name:  # "." has no name
        raise PgolfError(f"RUN_ID={name!r}: expected a folder name, not a path")
    return name


def check_config(cfg: Config) -> None:
    """Everything a configuration can get wrong fails here, before any work."""
    from pgolf.eval.ttt import runner_for
    from pgolf.model import validate
    from pgolf.quant import quantize as Q
    from pgolf.train import validate_training

    validate(cfg.model)
    validate_training(cfg)
    Q.validate(cfg.quant)
    runner_for(cfg)


def default_run_id(cfg: Config) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{cfg.preset}_s{cfg.train.seed}"


class Log:
    """The run's log: each line to stderr and to `train.log`, on rank 0 only."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str) -> None:
        if self.path is None:
            return
        print(msg, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


class RecordTrainer(Trainer):
    """pgolf's Trainer, logging its steps in the records' form (`N/ITER train_loss: ...`)."""

    def __init__(self, cfg: Config, ctx: distributed.Dist, say: Log):
        super().__init__(cfg, ctx, None)
        self.say = say

    def log(self, msg: str) -> None:
        if not TRAINER_STEP_LINE.match(msg):
            self.say(msg)

    def metric(self, row: dict[str, Any]) -> None:
        n = self.cfg.train.iterations
        if "train_loss" in row:
            tok_s = row["step"] * self.cfg.train.train_batch_tokens / max(row["time_s"], 1e-9)
            self.say(f"{row['step']}/{n} train_loss: {row['train_loss']:.4f} train_time: {row['time_s'] / 60:.1f}m "
                     f"tok/s: {tok_s:.0f}")
        else:
            self.say(f"{row['step']}/{n} val_loss: {row['val_loss']:.4f} val_bpb: {row['val_bpb']:.4f}")


def quantize(cfg: Config, model: GPT, state: dict[str, torch.Tensor], device: torch.device,
             say: Log, world_size: int = 1) -> tuple[bytes, dict[str, Any]]:
    """GPTQ calibration (training shards only, as rank 0 of `world_size`) timed against the reserve,
    then quantise + compress."""
    from pgolf.artifact.qstate import serialize
    from pgolf.quant import quantize as Q

    q, reserve = cfg.quant, cfg.train.gptq_reserve_seconds
    hessians: dict[str, torch.Tensor] = {}
    calib: dict[str, Any] = {}
    if q.method == "gptq":
        from pgolf.quant.hessian import calibrate

        hessians, calib = calibrate(model, cfg, world_size=world_size)
        spent = calib["calibration_data_seconds"] + calib["hessian_seconds"]
        calib.update(computed_by="record", reserve_seconds=reserve, within_reserve=spent <= reserve)
        say(f"GPTQ:collected {len(hessians)} Hessians in {spent:.1f}s (reserve {reserve:g}s)")
    t0 = time.perf_counter()
    qstate, info = Q.quantize_state_dict(state, q, hessians, device)
    blob, _ = serialize(qstate, q)
    methods = sorted({v["method"] for v in info["tensors"].values()}) or ["passthrough only"]
    say(f"quantize: {q.method} + {q.compressor} in {time.perf_counter() - t0:.1f}s ({', '.join(methods)}; "
        f"LQER on {len(info['lqer'])} tensors)")
    return blob, {"calibration": calib, "quant_method": q.method, "compressor": q.compressor,
                  "lqer_tensors": [x["name"] for x in info["lqer"]]}


def score_artifact(cfg: Config, ctx: distributed.Dist, path: Path, out: Path,
                   say: Log) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The artifact alone: loaded, scored without TTT, then with the configuration's TTT; returns the
    result's keys and the two scores."""
    from pgolf.artifact.qstate import load_artifact
    from pgolf.eval.bpb import load_val
    from pgolf.eval.score import score_stream
    from pgolf.eval.trace import EvalStream, find_docs, trace_path
    from pgolf.eval.ttt import method_label, run_ttt
    from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger, warmup
    from pgolf.model import build_with_state
    from pgolf.quant.pipeline import eval_seq_len

    ledger = TimeLedger(cfg.eval.max_seconds)
    with ledger.phase("load"):
        state = load_artifact(path.read_bytes(), path.name, cfg.quant)  # the format this configuration writes
        model = build_with_state(cfg, state, ctx.device, path.name).eval()
        seq_len = eval_seq_len(cfg)
        val = load_val(cfg.data.path, cfg.data.tokenizer or None, cfg.model.vocab_size, seq_len,
                       cfg.data.val_max_tokens, bos_id=cfg.data.bos_id)
    say(f"Deserialize: {path.name} and {val.num_targets:,} validation targets in {ledger.seconds['load']:.1f}s")
    n, docs = val.num_targets, find_docs(val.tokens, cfg.data.bos_id)
    base_stream = EvalStream(n, docs=docs, method="none")
    with ledger.phase("score"):
        base = score_stream(model, val, seq_len, cfg.eval.stride, cfg.eval.batch_seqs, rank=ctx.rank,
                            world_size=ctx.world_size, doc_mask=cfg.eval.doc_mask, stream=base_stream)
    base_stream.finish()
    say(f"diagnostic quantized val_loss:{base['val_loss']:.8f} val_bpb:{base['val_bpb']:.8f} "
        f"eval_time:{1000 * ledger.seconds['score']:.0f}ms")
    method = method_label(cfg)
    with ledger.phase("warmup"):  # random tokens, never validation data (docs/records/record-stack.md §5.1)
        warmup(model, cfg, lora=cfg.ttt.method == "lora", base=cfg.ttt.method != "lora" or cfg.ttt.phases > 0)
    say(f"ttt:warm-up on random tokens done ({ledger.seconds['warmup']:.1f}s)")
    stream = EvalStream(n, docs=docs, keep_trace=True, method=method)
    log = ConvergenceLog(out / "ttt.jsonl" if ctx.is_main else None, stream, method=method, label=path.name,
                         echo=say if ctx.is_main else None)
    say("beginning TTT eval timer")
    with ledger.phase("ttt"):
        final = run_ttt(model, val, cfg, stream, log=log, ledger=ledger, rank=ctx.rank, world_size=ctx.world_size)
    ttt_s = ledger.seconds["ttt"]
    say(f"quantized_ttt_{method} val_loss:{final['val_loss']:.8f} val_bpb:{final['val_bpb']:.8f} "
        f"eval_time:{1000 * ttt_s:.0f}ms")
    say(f"total_eval_time:{ttt_s:.1f}s")
    stream.trace().save(trace_path(out / "trace.npz", ctx.rank, ctx.world_size))
    # val_loss / val_bpb: the run's headline, its last score (with TTT), as its JSON line and `pgolf export`
    return {"val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "quant_val_bpb": base["val_bpb"],
            "quant_val_loss": base["val_loss"], "val_tokens": n, "ttt_method": method,
            "ttt_val_bpb": final["val_bpb"], "ttt_val_loss": final["val_loss"], "ttt_val_bpb_no_ttt": base["val_bpb"],
            "ttt_updates": final["updates"], "ttt_eval_seconds": round(ttt_s, 3), "eval_time": ledger.as_dict("ttt"),
            "trace": "trace.npz"}, base, final


def run_record(cfg: Config, ctx: distributed.Dist, out: Path, script: str) -> tuple[dict[str, Any], list[dict]]:
    """The whole pipeline into the run folder `out`; returns the run's result (result.json on rank 0)
    and its three scores (unquantised, quantised, with TTT) for `stages`."""
    if _status(out) == "finished":
        raise PgolfError(f"{out}: already holds a finished run (choose another RUN_ID / --out)")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("train.log", "ttt.jsonl"):  # a failed run's lines, if this folder held one
            (out / stale).unlink(missing_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        atomic_write_bytes(out / "train_gpt.py", script.encode())
    distributed.barrier()
    try:
        return _run(cfg, ctx, out, script, Log(out / "train.log" if ctx.is_main else None))
    except BaseException as e:
        if ctx.is_main:  # never recorded as finished; say what happened
            atomic_write_json(out / "result.json", {"status": "failed" if isinstance(e, Exception) else "interrupted",
                                                    "error": f"{type(e).__name__}: {e}"})
        raise


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "result.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _run(cfg: Config, ctx: distributed.Dist, out: Path, script: str, say: Log) -> tuple[dict[str, Any], list[dict]]:
    from pgolf.script.codebytes import measure

    t, q = cfg.train, cfg.quant
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say("Hyperparameters:")
    for section, values in cfg.to_dict().items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            say(f"  {section}{'.' + key if key else ''}: {value}")
    say(f"run_id: {out.name} world_size: {ctx.world_size} device: {ctx.device} torch: {torch.__version__}")
    trainer = RecordTrainer(cfg, ctx, say)
    say(f"train_shards: {len(trainer.loader.files)}")
    say(f"val_tokens: {trainer.val.num_targets}")
    say(f"model_params:{trainer.params}")
    if trainer.budget:
        say(f"gptq:reserving {t.gptq_reserve_seconds:g}s, effective={1000 * trainer.budget:.0f}ms")
    fit = trainer.fit()
    why = "stopping_early: wallclock_cap" if fit["steps"] < t.iterations else "stopping: iterations"
    say(f"{why} train_time: {1000 * fit['train_seconds']:.0f}ms step: {fit['steps']}/{t.iterations}")
    pre = trainer.validate(fit["steps"], fit["train_seconds"])
    say(f"diagnostic pre-quantization post-ema val_loss:{pre['val_loss']:.8f} val_bpb:{pre['val_bpb']:.8f} "
        f"eval_time:{1000 * pre['seconds']:.0f}ms")
    name = f"final_model.{q.method}.ptz"
    result: dict[str, Any] = {}
    if ctx.is_main:  # rank 0 quantises and writes; every rank then scores the file alone
        state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(out / "final_model.pt", buf.getvalue())
        say(f"Serialized model: {len(buf.getvalue())} bytes")
        t0 = time.perf_counter()
        blob, result = quantize(cfg, trainer.model, state, ctx.device, say, ctx.world_size)
        atomic_write_bytes(out / name, blob)
        result["quantize_seconds"] = round(time.perf_counter() - t0, 3)
        code = measure(script)
        say(f"Code size (uncompressed): {code['code_bytes_raw']} bytes")
        say(f"Code size (compressed): {code['code_bytes']} bytes")
        total = len(blob) + code["code_bytes"]
        say(f"Serialized model quantized+{q.compressor}: {len(blob)} bytes")
        say(f"Total submission size quantized+{q.compressor}: {total} bytes")
        result.update(code, model_bytes=len(blob), total_bytes=total, limit=q.limit_bytes,
                      under_limit=total <= q.limit_bytes)
    distributed.barrier()
    scores, base, final = score_artifact(cfg, ctx, out / name, out, say)
    result = {"pipeline": "record", "preset": cfg.preset, "seed": t.seed, "run_id": out.name, "run_dir": str(out),
              "status": "finished", "params": trainer.params, **fit, "world_size": ctx.world_size,
              "device": str(ctx.device), "attention_backend": trainer.backend, "val_loss_prequant": pre["val_loss"],
              "val_bpb_prequant": pre["val_bpb"], "val_bpb_train": pre["val_bpb"], **result,
              "artifact": str(out / name), **scores}
    if ctx.is_main:
        atomic_write_json(out / "result.json", result)
        say(f"final val_bpb:{scores['ttt_val_bpb']:.8f} bytes_total:{result['total_bytes']}")
    return result, [pre, base, final]


def stages(cfg: Config, result: dict[str, Any], scores: list[dict]) -> list[dict[str, Any]]:
    """The run's three scores as stages (pgolf.runs), as `pgolf train`, `quantize` and `eval --ttt`
    record theirs. (Not in the exported script: its bytes count; its result.json has the flat keys.)"""
    from pgolf.quant.pipeline import scoring_setting
    from pgolf.runs import artifact_stage, setting, stage

    pre, base, final = scores
    art, out = Path(result["artifact"]), result["run_dir"]
    return [stage("pre-quant", pre, by="record", weights="fp", artifact="final_model.pt",
                  setting=setting(cfg.train.eval_seq_len, 0, cfg.model.doc_mask)),  # Trainer.validate's windows
            artifact_stage("quantised", base, art, out, by="record", method=cfg.quant.method,
                           setting=scoring_setting(cfg), model_bytes=result["model_bytes"],
                           total_bytes=result["total_bytes"], under_limit=result["under_limit"]),
            artifact_stage("ttt", final, art, out, by="record", method=result["ttt_method"],
                           setting=f"seq_len={cfg.ttt.eval_seq_len} (test-time training)", updates=final["updates"],
                           fallback=final.get("ttt_fallback"))]


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON line a record run prints last (val_bpb: the score with TTT, the official one)."""
    return {"val_bpb": result["ttt_val_bpb"], "val_loss": result["ttt_val_loss"],
            "val_bpb_quantized": result["quant_val_bpb"], "val_bpb_prequant": result["val_bpb_prequant"],
            "bytes_total": result["total_bytes"], "bytes_model": result["model_bytes"],
            "bytes_code": result["code_bytes"], "bytes_code_raw": result["code_bytes_raw"], "steps": result["steps"],
            "train_seconds": result["train_seconds"], "eval_seconds": result["ttt_eval_seconds"],
            "seed": result["seed"], "run_dir": result["run_dir"]}


def main(cfg: Config) -> None:
    """The exported script's entry: CONFIG (the baked configuration) + the environment -> a record run;
    exit status 2 on bad input."""
    ctx = None
    try:
        apply_env(cfg, os.environ)
        check_config(cfg)
        ctx = distributed.setup()
        out = Path("runs") / distributed.broadcast_object(run_name(cfg, os.environ))
        result = run_record(cfg, ctx, out, Path(__file__).read_text())[0]
    except PgolfError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if ctx is not None:
            distributed.teardown()
    if ctx.is_main:
        print(json.dumps(summary(result)))
    distributed.leave(0)


def cli(argv: list[str] | None = None) -> int:
    """`python -m pgolf.export.record ...`: the same pipeline from pgolf, for any preset or config."""
    from pgolf.envinfo import environment
    from pgolf.script.bundle import build
    from pgolf.runs import RunDir
    from pgolf.train import resolve_config

    from pgolf.cli import Parser, UsageError

    ap = Parser(prog="python -m pgolf.export.record", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="baseline")
    ap.add_argument("--config", default=None, help="a config.json to start from instead of a preset")
    ap.add_argument("--data", default=None)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--out", default=None, help="run folder (default runs/RUN_ID)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--debug", action="store_true")
    try:
        args = ap.parse_args(argv)
    except UsageError as e:
        print(f"pgolf: error: {e}", file=sys.stderr)
        return 2
    ctx = None
    try:
        cfg = apply_env(resolve_config(args), os.environ)
        check_config(cfg)
        script = build(cfg).text
        ctx = distributed.setup()
        out = Path(distributed.broadcast_object(str(Path(args.out) if args.out else
                                                    Path(args.runs_root) / run_name(cfg, os.environ))))
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "env.json", {**environment(cfg.data.path, cfg.data.tokenizer or
                                                               Path(cfg.data.path) / "tokenizer.model", ctx.device),
                                                 "world_size": ctx.world_size, "dist_backend": ctx.backend})
        result, scores = run_record(cfg, ctx, out, script)
        if ctx.is_main:
            result = RunDir(out).finish({**result, "stages": stages(cfg, result, scores)})
    except PgolfError as e:
        if args.debug:
            raise
        print(f"pgolf: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            distributed.teardown()
    if ctx.is_main:
        print(json.dumps(summary(result), default=str))
    return 0


if __name__ == "__main__":
    distributed.leave(cli())
