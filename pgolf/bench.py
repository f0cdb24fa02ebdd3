"""`pgolf bench`: time training steps of a preset on the current device, on synthetic tokens
(`--quant`: the artifact's phases, pgolf.quant.bench; `--ttt`: TTT throughput, pgolf.eval.bench).

Reports ms/step, tokens/s and MFU (model FLOPs utilisation: 6 N + 6 L d (T + 1) FLOPs per token, over
the device's dense bf16 peak; `pgolf plan` predicts the same step from its FLOPs). Performance targets
live here and in docs/perf.md, never in tests.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from pgolf.errors import PgolfError

# Dense bf16 peaks (TFLOP/s) used for MFU; None where unknown (MFU then reported as null).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def matmul_params(model) -> int:
    """N of 6 N: every matmul weight as often as the forward applies it (looped blocks once per visit; the
    head once; embedding tables are lookups, not matmuls)."""
    import torch.nn as nn

    cfg = model.cfg
    block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, nn.Linear)) for b in model.blocks]
    n = sum(block[i] for i in model.layer_order())
    n += sum(m.weight.numel() for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not name.startswith("blocks."))
    if cfg.tie_embeddings:  # the tied head is the embedding table used as a matmul (lm_head is counted above)
        n += cfg.vocab_size * cfg.model_dim
    return n


def flops_per_token(model, seq_len: int) -> float:
    """6 N + 6 L d (T + 1) (docs/perf.md): the matmuls forward and backward, and causal attention over
    segments of T tokens (4 d FLOPs per (query, key) pair forward, twice that backward, (T + 1) / 2 pairs
    per token) on the L virtual layers. `pgolf plan` counts the same with FlopCounterMode."""
    return 6.0 * matmul_params(model) + 6.0 * len(model.layer_order()) * model.cfg.model_dim * (seq_len + 1)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from pgolf import distributed
    from pgolf.model import build_model, count_params
    from pgolf.model.attention import resolve_backend
    from pgolf.model.compile import compile_train
    from pgolf.optim import EMA, build_optimizers
    from pgolf.presets import get_preset
    from pgolf.train import batch_shape, optimizer_step

    if getattr(args, "quant", False) and getattr(args, "ttt", False):
        raise PgolfError("--quant / --ttt: one benchmark at a time")
    if getattr(args, "ttt", False):
        return _bench_ttt(args)
    if getattr(args, "quant", False) or getattr(args, "run", None):
        return _bench_quant(args)
    if args.steps < 1 or args.warmup < 0:
        raise PgolfError(f"--steps {args.steps} / --warmup {args.warmup}: need at least 1 timed step and "
                         "0 or more warm-up steps")
    cfg = get_preset(args.preset, args.overrides)
    ctx = distributed.setup()
    dev = ctx.device
    t = cfg.train
    micro, accum = batch_shape(cfg, ctx.world_size)
    backend = resolve_backend(t.attention_backend, dev)
    torch.manual_seed(t.seed)
    model = build_model(cfg, dev, attention_backend=backend)
    model.fused_ce = t.fused_ce and dev.type == "cuda"
    looping = {"on": True, "off": False}.get(args.looping, False)
    model.looping = looping and bool(cfg.model.num_loops)
    compiled = t.compile and dev.type == "cuda"
    step_model: Any = compile_train(model) if compiled else model
    opt = build_optimizers(model, cfg.optim, cfg.model.tie_embeddings, compile_ns="inductor" if compiled else None)
    packed = cfg.data.segmentation == "varlen"  # one packed row per micro-step, as the loader yields
    rows, width = (1, micro) if packed else (micro // t.train_seq_len, t.train_seq_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randint(0, cfg.model.vocab_size, (rows, width + 1), generator=gen)
                .to(dev)) for _ in range(4)]

    ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

    def step(i: int) -> None:  # the trainer's own optimizer step (EMA included), on synthetic tokens
        bs = [batches[(i * accum + a) % len(batches)] for a in range(accum)]
        optimizer_step(step_model, model, opt, ema, [(b[:, :-1], b[:, 1:]) for b in bs],
                       cfg.optim.grad_clip_norm, 1.0, i, cfg.optim)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i in range(args.warmup):
        step(i)
    sync()
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    distributed.teardown()
    ms = 1000 * statistics.median(times)
    tokens = micro * accum * ctx.world_size
    tps = tokens / (ms / 1000)
    peak = peak_tflops(dev)
    mfu = tps / ctx.world_size * flops_per_token(model, t.train_seq_len) / (peak * 1e12) if peak else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "preset": args.preset, "attention_backend": backend, "compiled": step_model is not model,
            "looping": model.looping, "params": count_params(model), "tokens_per_step": tokens,
            "accum_steps": accum, "ms_per_step": round(ms, 2),
            "ms_per_step_mean": round(1000 * statistics.mean(times), 2),
            "tokens_per_s": round(tps), "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
            "steps": args.steps}


def _config(args: argparse.Namespace):
    """The run's config (with --run) or the preset's, with the --set overrides."""
    from pgolf.config import Config
    from pgolf.presets import get_preset

    if args.run:
        from pgolf.runs import resolve

        return Config.load(resolve(args.run).file("config.json")).with_overrides(args.overrides)
    return get_preset(args.preset, args.overrides)


def _bench_quant(args: argparse.Namespace) -> dict[str, Any]:
    from pgolf.quant.bench import bench_quant

    return bench_quant(_config(args), run_dir=args.run, codecs=args.codecs)


def _bench_ttt(args: argparse.Namespace) -> dict[str, Any]:
    from pgolf.eval.bench import bench_ttt

    return bench_ttt(_config(args), tokens=args.tokens, run_dir=args.run)
