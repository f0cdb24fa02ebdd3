"""Training under a wall-clock budget: `python -m pgolf.train` (works under torchrun) or `pgolf train`.

One process, or `torchrun --nproc_per_node=N -m pgolf.train ...` (NCCL on CUDA, gloo on the CPU), or
one torchrun agent per node with `--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT`: RANK picks
the data shard and the writer (global rank 0, on whichever node the rendezvous put it), LOCAL_RANK only
the CUDA device.
The global batch is `train.train_batch_tokens`, reached by gradient accumulation. Compile warm-up
steps are rolled back (weights, optimizer state and data order restored) before the timer starts.
Validation time is excluded from the training clock. Rank 0 writes the run directory; the run is
recorded as finished only after the final evaluation and the export have succeeded.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pgolf import distributed
from pgolf.config import Config
from pgolf.config_domains import check as check_domains
from pgolf.errors import PgolfError
from pgolf.fileio import check_output
from pgolf.runs import RunDir, move_aside, new_run_id


# --------------------------------------------------------------------------- configuration
def resolve_config(args: argparse.Namespace) -> Config:
    """Preset (or --config) + --set overrides + the explicit flags, validated."""
    from pgolf.presets import get_preset

    if getattr(args, "config", None):
        cfg = Config.load(args.config).with_overrides(args.overrides)
    else:
        cfg = get_preset(args.preset or "baseline", args.overrides)
    if args.data:
        cfg.data.path = args.data
    if args.tokenizer:
        cfg.data.tokenizer = args.tokenizer
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.max_seconds is not None:
        cfg.train.max_seconds = args.max_seconds
    check_config(cfg)  # again: the flags above bypass Config.from_dict
    return cfg


def check_config(cfg: Config, where: str = "config") -> None:
    """What `pgolf train` checks before it starts: every numeric field in its domain, the model's
    settings, the optimizer's and training's. For a configuration whose fields were set directly."""
    from pgolf.model import validate

    check_domains(cfg, where)
    validate(cfg.model)
    validate_training(cfg)


def validate_training(cfg: Config) -> None:
    """Reject optimizer and training settings that cannot work, naming the key (numeric domains are
    checked by `pgolf.config_domains`; these are choices and rules between fields)."""
    from pgolf.model.attention import BACKENDS

    o, t = cfg.optim, cfg.train
    checks = [
        ("optim.muon_coeffs", o.muon_coeffs in ("classic", "polar_express"), "expected classic or polar_express"),
        ("optim.grad_clip_scope", o.grad_clip_scope in ("global", "rank"), "expected global or rank"),
        ("optim.muon_warmup_momentum", o.muon_warmup_momentum in ("reset", "keep_sharded"),
         "expected reset or keep_sharded"),
        ("train.gptq_reserve_seconds", t.max_seconds == 0 or t.gptq_reserve_seconds < t.max_seconds,
         "expected within [0, max_seconds)"),
        ("train.export", t.export in ("int8", "none"), "expected int8 or none"),
        ("train.attention_backend", t.attention_backend in BACKENDS, f"expected one of {BACKENDS}"),
    ]
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise PgolfError(f"{key}: {getattr(getattr(cfg, section), name)!r}: {why}")


def keeps_warmup_momentum(cfg: Config, world: int) -> bool:
    """Whether Muon's momentum survives the warm-up's roll-back (`optim.muon_warmup_momentum`)."""
    return cfg.optim.muon_warmup_momentum == "keep_sharded" and world > 1


def batch_shape(cfg: Config, world: int) -> tuple[int, int]:
    """(tokens per rank per micro-step, accumulation steps) for the global batch."""
    t = cfg.train
    micro = t.micro_batch_tokens or t.train_batch_tokens // world
    if micro <= 0 or micro % t.train_seq_len:
        raise PgolfError(f"train.micro_batch_tokens: {micro} tokens per rank is not a positive multiple of "
                         f"train.train_seq_len {t.train_seq_len}")
    if t.train_batch_tokens % (micro * world):
        raise PgolfError(f"train.train_batch_tokens: {t.train_batch_tokens} is not a multiple of "
                         f"{world} ranks x {micro} tokens per micro-step")
    return micro, t.train_batch_tokens // (micro * world)


def val_batch_seqs(cfg: Config, world: int) -> int:
    """Sequences per rank per validation forward: val_batch_tokens / world in fixed rows; a packed row
    (varlen) holds val_batch_tokens / (world x accumulation) tokens, as the records' eval_val
    (524,288 -> 32 x 2048 on 8 GPUs x 1 or 1 GPU x 8)."""
    t = cfg.train
    ranks = world * (batch_shape(cfg, world)[1] if cfg.data.segmentation == "varlen" else 1)
    return max(1, t.val_batch_tokens // t.eval_seq_len // ranks)


# --------------------------------------------------------------------------- the loop
def optimizer_step(step_model, model, opt, ema, batches, clip: float, lr_mult: float, step: int,
                   oc=None) -> torch.Tensor:
    """Accumulate over `batches` [(x, y)], average grads across ranks and clip (`opt.reduce_and_clip`:
    Muon's matrices are reduce-scattered, Parallel Muon), step, update the EMA.
    With `oc` (the OptimConfig), the CROWN-Q penalty is added once it is active (pgolf.optim.crownq).

    `step_model` is the (possibly compiled) module the forward runs through; `model` owns the weights.
    Returns the mean loss as a 0-d tensor (no host sync)."""
    from pgolf.eval.score import autocast_for
    from pgolf.optim.crownq import crown_q_active, crown_q_penalty

    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast_for(device):
            loss = step_model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach() / len(batches)
    if oc is not None and crown_q_active(oc, lr_mult):  # the same weights, so the same term, on every rank
        (oc.crown_q_lambda * crown_q_penalty(model, oc.crown_q_clip_range)).backward()
    opt.reduce_and_clip(clip)
    opt.step(lr_mult, step)
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return total


def step_consensus(loss: torch.Tensor, elapsed: float, main: bool) -> tuple[bool, float]:
    """(the loss is not finite on some rank, rank 0's training clock): one all-reduce and one host read
    per step, after the per-step sync. Each rank's own clock drifts from the others' (rank 0 logs and
    writes between steps), so every rank takes the budget stop, the learning-rate schedule and the switch
    to depth recurrence from rank 0's: they stop and switch looping on the same step (ranks that loop
    on different steps run different graphs, and a learned carry then has a gradient on some ranks
    only). Divergence is caught on the step it happens."""
    flags = torch.stack([(~torch.isfinite(loss)).double(),
                         torch.tensor(elapsed if main else 0.0, dtype=torch.float64, device=loss.device)])
    distributed.all_reduce_sum_([flags])
    diverged, clock = flags.tolist()
    return diverged > 0, clock


class Trainer:
    def __init__(self, cfg: Config, ctx: distributed.Dist, run: RunDir | None):
        from pgolf.data.loader import TrainLoader
        from pgolf.eval.bpb import load_val
        from pgolf.model import build_model, count_params
        from pgolf.model.attention import resolve_backend
        from pgolf.optim import EMA, build_optimizers

        self.cfg, self.ctx, self.run = cfg, ctx, run
        t = cfg.train
        # Inputs first: a bad data dir or tokenizer fails before anything is written.
        self.val = load_val(cfg.data.path, cfg.data.tokenizer or None, cfg.model.vocab_size, t.eval_seq_len,
                            cfg.data.val_max_tokens, bos_id=cfg.data.bos_id)
        self.loader = TrainLoader(cfg.data.path, t.train_seq_len, ctx.rank, ctx.world_size, cfg.model.vocab_size,
                                  cfg.data.segmentation, cfg.data.bos_id, cfg.data.shard_end)
        self.micro, self.accum = batch_shape(cfg, ctx.world_size)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.backend = resolve_backend(t.attention_backend, ctx.device)
        self.model = build_model(cfg, ctx.device, attention_backend=self.backend)
        self.model.fused_ce = t.fused_ce and ctx.device.type == "cuda"
        self.params = count_params(self.model)
        self.step_model: Callable[..., Any] = self.model  # or its torch.compile wrapper
        compiled = t.compile and ctx.device.type == "cuda"
        if compiled:  # fullgraph: a graph break is an error (pgolf.model.compile)
            from pgolf.model.compile import compile_train
            self.step_model = compile_train(self.model)
        self.opt = build_optimizers(self.model, cfg.optim, cfg.model.tie_embeddings,
                                    compile_ns="inductor" if compiled else None)
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self.budget = max(t.max_seconds - t.gptq_reserve_seconds, 0.0) if t.max_seconds > 0 else 0.0
        self.timings: dict[str, float] = {}
        self.run_path: Path | None = None  # set by train(): the same on every rank

    # ---- helpers
    def log(self, msg: str) -> None:
        if self.run is not None:
            self.run.log(msg)

    def metric(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.append_jsonl("metrics.jsonl", row)

    def train_step(self, step: int, lr_mult: float) -> torch.Tensor:
        """One optimizer step over the global batch; returns the mean loss (a 0-d tensor)."""
        batches = self.loader.next_batch(self.micro, self.accum, self.ctx.device)
        return optimizer_step(self.step_model, self.model, self.opt, self.ema, batches,
                              self.cfg.optim.grad_clip_norm, lr_mult, step, self.cfg.optim)

    def sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def warmup(self) -> None:
        """Compile warm-up on real training batches, then roll everything back (docs/records/record-stack.md §3.8)."""
        n = self.cfg.train.warmup_steps
        if n <= 0:
            return
        t0 = time.perf_counter()
        model_state = copy.deepcopy(self.model.state_dict())
        opt_state = self.opt.state_dict()
        modes = [False, True] if self.cfg.model.num_loops else [False]
        for looping in modes:
            self.model.looping = looping
            for i in range(n):
                self.train_step(i, 1.0)
        self.model.load_state_dict(model_state)
        self.opt.load_state_dict(opt_state, keep_muon_momentum=keeps_warmup_momentum(self.cfg, self.ctx.world_size))
        if self.ema is not None:
            self.ema = type(self.ema)(self.model, self.cfg.optim.ema_decay)
        self.model.looping = False
        self.loader.reset()
        self.sync()
        self.timings["warmup_s"] = time.perf_counter() - t0
        self.log(f"warmup: {n} steps x {len(modes)} mode(s) in {self.timings['warmup_s']:.1f}s, rolled back")

    def validate(self, step: int, elapsed: float) -> dict[str, Any]:
        from pgolf.eval.score import evaluate
        res = evaluate(self.model, self.val, self.cfg.train.eval_seq_len, val_batch_seqs(self.cfg, self.ctx.world_size),
                       rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.metric({"step": step, "time_s": round(elapsed, 3), "val_loss": res["val_loss"], "val_bpb": res["val_bpb"]})
        self.log(f"step {step} val_loss {res['val_loss']:.4f} val_bpb {res['val_bpb']:.4f} ({res['seconds']:.1f}s)")
        return res

    @staticmethod
    def mean_loss(loss: torch.Tensor) -> float:
        """The loss averaged over ranks (a collective: every rank calls it)."""
        lt = loss.clone()
        distributed.all_reduce_mean_([lt])
        return lt.item()

    def log_step(self, step: int, loss: torch.Tensor, mult: float, elapsed: float) -> float:
        """Log the rank-mean training loss of `step` (every rank calls it) and return it."""
        value = self.mean_loss(loss)
        self.metric({"step": step, "time_s": round(elapsed, 3), "train_loss": value, "lr_mult": mult})
        self.log(f"step {step} loss {value:.4f} lr x{mult:.3f} {1000 * elapsed / step:.0f}ms/step")
        return value

    def fit(self) -> dict[str, Any]:
        from pgolf.optim.schedule import lr_multiplier

        cfg, t = self.cfg, self.cfg.train
        self.warmup()
        elapsed, step, last_loss, logged = 0.0, 0, float("nan"), 0
        self.log(f"training: {self.params:,} params, batch {t.train_batch_tokens} tokens = {self.ctx.world_size} "
                 f"ranks x {self.accum} x {self.micro}, budget {self.budget:.0f}s, attention {self.backend}")
        while step < t.iterations:
            if (cfg.model.num_loops and not self.model.looping and self.budget > 0
                    and elapsed >= cfg.model.enable_looping_at * self.budget):
                self.model.looping = True  # depth recurrence on from this fraction of the budget
                self.log(f"step {step}: looping on, order {self.model.layer_order()}")
            if t.val_every and step % t.val_every == 0:  # step 0 too, as the official script does
                self.validate(step, elapsed)  # its .item() calls leave the device idle: no sync needed
            t0 = time.perf_counter()
            mult = lr_multiplier(step, elapsed, t, self.budget, 1000 * elapsed / max(step, 1))
            loss = self.train_step(step, mult)
            self.sync()
            elapsed += time.perf_counter() - t0
            step += 1
            diverged, elapsed = step_consensus(loss, elapsed, self.ctx.is_main)
            spent = self.budget > 0 and elapsed >= self.budget
            if diverged:
                raise PgolfError(f"step {step}: training loss is {self.mean_loss(loss)} (diverged)")
            if step % t.log_every == 0 or step == 1:
                last_loss, logged = self.log_step(step, loss, mult, elapsed), step
            if spent:
                break
        if step != logged:  # the last step is always logged: train_loss is the final loss
            last_loss = self.log_step(step, loss, mult, elapsed)
        if cfg.model.num_loops:
            self.model.looping = True  # looping stays on for evaluation (docs/records/record-stack.md §2.6)
        if self.ema is not None:
            self.ema.copy_to(self.model)  # the EMA weights are the ones evaluated and exported
        self.timings["train_s"] = elapsed
        self.log(f"stopped at step {step} after {elapsed:.1f}s of training")
        return {"steps": step, "train_seconds": elapsed, "train_loss": last_loss}

    def export_int8(self) -> dict[str, Any]:
        """The baseline artifact (per-row int8 + zlib), re-evaluated from the file alone."""
        from pgolf.eval.score import evaluate
        from pgolf.model import build_model
        from pgolf.artifact.int8 import export_int8, load_int8

        out: dict[str, Any] = {}
        if self.cfg.train.export != "int8":
            return out
        t0 = time.perf_counter()
        name = "final_model.int8.ptz"
        blob = None
        if self.run is not None:  # rank 0 writes; every rank then scores the file's bytes alone
            blob = export_int8(_cpu_state(self.model))
            self.run.write_bytes(name, blob)
        # Sent, not re-read: ranks on other nodes need not see rank 0's filesystem.
        blob = distributed.broadcast_object(blob)
        fresh = build_model(self.cfg, self.ctx.device, attention_backend=self.backend)
        fresh.load_state_dict(load_int8(blob))
        fresh.looping = self.model.looping
        res = evaluate(fresh, self.val, self.cfg.train.eval_seq_len, val_batch_seqs(self.cfg, self.ctx.world_size),
                       rank=self.ctx.rank, world_size=self.ctx.world_size)
        code = _code_bytes(self.cfg)
        out = {"artifact": name, "model_bytes": len(blob), **code,
               "total_bytes": len(blob) + code["code_bytes"], "limit": self.cfg.quant.limit_bytes,
               "artifact_val_loss": res["val_loss"], "artifact_val_bpb": res["val_bpb"],
               "artifact_val_tokens": res["tokens"], "artifact_val_bytes": res["bytes"]}
        self.timings["export_s"] = time.perf_counter() - t0
        self.log(f"artifact {name}: {len(blob):,} B model + {code['code_bytes']:,} B code; "
                 f"val_bpb from the file alone {res['val_bpb']:.4f}")
        return out


def _code_bytes(cfg: Config) -> dict[str, int]:
    """Code bytes as the records count them: the exported record script, minified and wrapped."""
    from pgolf.script.codebytes import code_bytes
    info = code_bytes(cfg)
    return {"code_bytes": int(info["code_bytes"]), "code_bytes_raw": int(info["code_bytes_raw"])}


def train(cfg: Config, ctx: distributed.Dist, out: str | None = None, runs_root: str = "runs") -> dict[str, Any]:
    from pgolf.envinfo import environment

    t_start = time.perf_counter()
    run = None
    # Rank 0 names the run (the name has the clock in it); every rank checks it before anything runs.
    run_path = Path(distributed.broadcast_object(
        str(Path(out) if out else Path(runs_root) / new_run_id(cfg.preset, cfg.train.seed))))
    if RunDir(run_path).is_finished():
        raise PgolfError(f"{run_path}: already holds a finished run (choose another --out)")
    check_output(run_path, "--out", kind="dir")  # a file there, or an unwritable parent: fail before training
    trainer = Trainer(cfg, ctx, None)
    # Shards too short for one batch fail now, before the run directory exists; then back to the start.
    trainer.loader.next_batch(trainer.micro, trainer.accum)
    trainer.loader.reset()
    trainer.run_path = run_path
    if ctx.is_main:
        # An unfinished earlier attempt (finished ones are refused above) wrote what the trainer writes; a
        # config.json alone is the one a notebook wrote for this launch (workbench.write_config).
        earlier = any((run_path / f).exists() for f in ("env.json", "train.log", "metrics.jsonl", "result.json"))
        moved = move_aside(run_path) if earlier else None
        run = RunDir.create(run_path)
        run.write_json("config.json", cfg.to_dict())
        tokenizer = cfg.data.tokenizer or Path(cfg.data.path) / "tokenizer.model"
        run.write_json("env.json", {**environment(cfg.data.path, tokenizer, ctx.device, trainer.backend),
                                    "world_size": ctx.world_size, "device": str(ctx.device),
                                    "dist_backend": ctx.backend})
        run.log(f"pgolf train: preset {cfg.preset}, seed {cfg.train.seed}, world {ctx.world_size}, device {ctx.device}")
        run.log("config " + json.dumps(cfg.to_dict()), echo=False)
        if moved is not None:
            run.log(f"pgolf train: an unfinished earlier attempt in {run_path} was moved to {moved}")
    trainer.run = run
    trainer.timings["setup_s"] = time.perf_counter() - t_start
    try:
        fit = trainer.fit()
        t0 = time.perf_counter()
        final = trainer.validate(fit["steps"], fit["train_seconds"])
        trainer.timings["final_eval_s"] = time.perf_counter() - t0
        if run is not None:
            run.write_bytes("final_model.pt", _state_bytes(trainer.model))
        export = trainer.export_int8()
        if run is not None and cfg.quant.method == "gptq" and cfg.train.gptq_reserve_seconds > 0:
            # GPTQ calibration reads training data: it runs here, inside the reserve the loop left
            # free (docs/records/record-stack.md §3.9), and `pgolf quantize` reuses the cached Hessians.
            from pgolf.quant.hessian import cached_hessians
            t0 = time.perf_counter()
            _, calib = cached_hessians(run.path, trainer.model, cfg, caller="train")
            trainer.timings["gptq_calibration_s"] = time.perf_counter() - t0
            export["calibration"] = calib
            run.log(f"GPTQ calibration {trainer.timings['gptq_calibration_s']:.1f}s "
                    f"(reserve {cfg.train.gptq_reserve_seconds:.1f}s, within: {calib.get('within_reserve')})")
    except BaseException as e:
        if run is not None:  # never recorded as finished; say what happened
            run.write_json("result.json", {"status": "failed" if isinstance(e, Exception) else "interrupted",
                                           "error": f"{type(e).__name__}: {e}" if str(e) else type(e).__name__})
        raise
    result = {"run_dir": str(run_path), "preset": cfg.preset, "seed": cfg.train.seed, "params": trainer.params,
              **fit, "val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "val_tokens": final["tokens"],
              "val_bytes": final["bytes"], "attention_backend": trainer.backend, "device": str(ctx.device),
              "world_size": ctx.world_size, **export,
              "timings": {k: round(v, 3) for k, v in trainer.timings.items()}}
    if run is not None:
        result = run.finish({**result, "stages": _stages(cfg, run, final, export)})
        run.log(f"finished: val_bpb {final['val_bpb']:.4f}")
    return result


def _stages(cfg: Config, run: RunDir, final: dict[str, Any], export: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainer's two scores as stages (pgolf.runs): the final weights, and its export from the file alone."""
    from pgolf.runs import artifact_stage, setting, stage

    how = setting(cfg.train.eval_seq_len, 0, cfg.model.doc_mask)  # evaluate(): non-overlapping windows
    out = [stage("pre-quant", final, by="train", weights="fp", artifact="final_model.pt", setting=how)]
    if export.get("artifact"):  # train.export != "none"
        score = {"val_bpb": export["artifact_val_bpb"], "val_loss": export["artifact_val_loss"],
                 "tokens": export["artifact_val_tokens"], "bytes": export["artifact_val_bytes"]}
        out.append(artifact_stage("quantised", score, run.file(export["artifact"]), run.path, by="train",
                                  method=cfg.train.export, setting=how, model_bytes=export["model_bytes"],
                                  total_bytes=export["total_bytes"]))
    return out


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _state_bytes(model: torch.nn.Module) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(_cpu_state(model), buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- entry points
def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    if args.config and args.preset:  # the config names its preset: two answers, so neither is chosen silently
        raise PgolfError(f"--config {args.config} and --preset {args.preset} conflict: a config.json holds its whole "
                         "configuration, preset included (give one; --set changes fields of either)")
    cfg = resolve_config(args)
    ctx = distributed.setup()
    try:
        if ctx.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        result = train(cfg, ctx, args.out, args.runs_root)
    finally:
        distributed.teardown()
    keys = ("run_dir", "preset", "seed", "params", "steps", "train_seconds", "val_loss", "val_bpb",
            "model_bytes", "total_bytes", "attention_backend")
    return {k: result.get(k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    """`python -m pgolf.train ...` (the torchrun entry): same flags as `pgolf train`."""
    from pgolf.cli import main as cli_main
    import os
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:  # only rank 0 prints the final JSON line
        sys.stdout = open(os.devnull, "w")
    debug = ["--debug"] if "--debug" in argv else []
    return cli_main([*debug, "train", *[a for a in argv if a != "--debug"]])


if __name__ == "__main__":
    distributed.leave(main())
