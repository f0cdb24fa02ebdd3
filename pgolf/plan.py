"""`pgolf plan`: what a configuration will cost on an H100, worked out on the CPU (issue 12).

Per rank and per optimizer step, at the configuration's real micro-batch and sequence length:
- memory: parameters, gradients and optimizer state from the tensors themselves (Muon's momentum for
  this rank's shard only, Parallel Muon), the fp32 EMA copy, and the activations of one micro-batch's
  forward + backward: the peak of the storages it allocates, tracked op by op on fake tensors
  (FakeTensorMode: shapes, no data; torch's MemTracker cannot follow frozen weights, as in TTT). These
  are the activations of the eager forward, an upper bound: Inductor fuses elementwise chains and
  recomputes cheap ones, so a compiled step keeps less (the #1855 record: 41,717 MiB peak).
- FLOPs of forward + backward (torch.utils.flop_counter.FlopCounterMode) through FlashAttention-3's
  call (the stand-in of pgolf.model.flash_ref, whose formula counts the causal pairs of each segment),
  for every looping mode; the analytic count beside it (docs/perf.md): 6 N + 6 L d (T + 1) per token.
- the step time those FLOPs imply at `--mfu` of an H100's dense bf16 peak, side by side with the
  records' measured step times; the same for the LoRA TTT step and for GPTQ (calibration forward,
  Hessians, the solve).
- the compile check (pgolf.compile_check): graph breaks and recompiles of this configuration, with
  dynamo's trace by default; `--compile-backend inductor` lowers and builds the whole step with
  Inductor's CPU code generator (the step a GPU run would lower to Triton instead; minutes here).
Every number is a prediction; docs/perf.md keeps them apart from measurements. Exit 2 when a rank's
predicted peak is over 80 GB.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import weakref
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pgolf.config import Config
from pgolf.errors import PgolfError

H100_BF16_TFLOPS = 989.0  # dense bf16 peak (pgolf.bench.PEAK_TFLOPS)
H100_TF32_TFLOPS = 494.7  # dense TF32 peak: the fp32 Hessians and the GPTQ solve
LIMIT_GB = 80.0  # GB = 1e9 bytes
GB = 1e9

# Measured on the hardware the records ran (docs/records/record-stack.md): ms per GPU step and tokens of that step.
MEASURED: dict[str, dict[str, Any]] = {
    "pr1855": {"source": "docs/records/record-stack.md §2.6, §3.10, §6.1 (8xH100 SXM)", "nproc": 8,
               "tokens_per_gpu_step": 98_304, "ms_per_step": {"looping_off": 96.0, "looping_on": 141.0},
               "peak_memory_gb": 41_717 * 2**20 / GB,  # 41,717 MiB allocated (seed 42)
               # 47,851,520 scored targets (CaseOps val) in the 455-509 s TTT timer (mean 478 s) on 8 GPUs
               "ttt_scored_tokens_per_s_per_gpu": round(47_851_520 / 478.0 / 8),
               "gptq_hessian_s": [3.4, 4.9]},
    "baseline": {"source": "the official baseline log (issue 12): 1xH100", "nproc": 1,
                 "tokens_per_gpu_step": 524_288, "ms_per_step": {"looping_off": 360.7}},
}


@contextlib.contextmanager
def _fake(meta_model) -> Iterator[Any]:
    """`meta_model` materialised as fake CPU tensors (FakeTensorMode: shapes and dtypes, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield meta_model.to_empty(device="cpu")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under it and still alive, and their peak (fake tensors have
    sizes, so this works without memory; the equivalent of a CUDA allocator's peak for what `fn` adds)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.refs:
            return
        n = st.nbytes()

        def freed(_, key=key, n=n):
            self.now -= n
            self.refs.pop(key, None)
        self.refs[key] = weakref.ref(st, freed)
        self.now += n
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _tracked(fn) -> tuple[float, dict[str, int]]:
    """Peak bytes allocated by `fn()` (activations, temporaries, gradients as they appear) and its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, _LiveBytes() as live:
        fn()
    return float(live.peak), {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}


def _packed_tokens(cfg: Config, rows: int, width: int) -> torch.Tensor:
    """Synthetic rows (rows, width + 1): BOS every train_seq_len tokens, so every segment is full length."""
    x = torch.randint(2, cfg.model.vocab_size, (rows, width + 1), generator=torch.Generator().manual_seed(0))
    x[:, ::cfg.train.train_seq_len] = cfg.data.bos_id
    return x


def state_memory(model, cfg: Config, nproc: int) -> dict[str, float]:
    """Bytes per rank of the parameters, gradients, optimizer state (Muon momentum of this rank's shard,
    AdamW's two moments) and the fp32 EMA copy."""
    from pgolf.optim.groups import classify_params

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = classify_params(model)
    banks: dict[tuple, list] = {}
    for _, p in groups["muon"]:
        banks.setdefault((tuple(p.shape), p.dtype), []).append(p)
    mom = 2 if cfg.optim.muon_momentum_bf16 else 4
    muon = sum(math.ceil(len(ps) / nproc) * ps[0].numel() * mom for ps in banks.values())
    adam = sum(2 * p.numel() * p.element_size() for g in ("embed", "head", "scalar") for _, p in groups[g])
    ema = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) \
        if cfg.optim.ema_decay > 0 else 0
    return {"parameters": params, "gradients": params, "optimizer": muon + adam, "ema": ema}


def plan_training(cfg: Config, nproc: int, kernel: str) -> dict[str, Any]:
    """Activations and FLOPs of one micro-batch forward + backward per looping mode (fake tensors)."""
    from pgolf.bench import flops_per_token
    from pgolf.model import build_model
    from pgolf.train import batch_shape

    micro, accum = batch_shape(cfg, nproc)
    packed = cfg.data.segmentation == "varlen"
    rows, width = (1, micro) if packed else (micro // cfg.train.train_seq_len, cfg.train.train_seq_len)
    x = _packed_tokens(cfg, rows, width)
    meta = build_model(cfg, "meta", attention_backend=kernel)
    meta.fused_ce = False  # the eager CE: an upper bound on what the fused one keeps
    mask = meta.attention_mask(x[:, :-1])  # data-dependent: built from real tokens, outside fake mode
    modes = [False, True] if cfg.model.num_loops else [False]
    out: dict[str, Any] = {"micro_batch_tokens": micro, "accum_steps": accum, "tokens_per_rank_step": micro * accum,
                           "modes": {}}
    with _fake(meta) as model:
        for looping in modes:
            model.looping = looping

            def step(model=model):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(x[:, :-1], x[:, 1:], mask=mask)
                loss.backward()

            mem, flops = _tracked(step)
            out["modes"]["looping_on" if looping else "looping_off"] = {
                "activations": mem,
                "flops_per_token": sum(flops.values()) / (rows * width),
                "attention_flops_per_token": sum(v for k, v in flops.items() if "attn" in k) / (rows * width),
                "analytic_flops_per_token": flops_per_token(model, cfg.train.train_seq_len)}
            model.zero_grad(set_to_none=True)
        out["state"] = state_memory(model, cfg, nproc)
        out["params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def plan_ttt(cfg: Config, kernel: str) -> dict[str, Any]:
    """LoRA TTT's step at the full context: B documents x eval_seq_len, chunk_size scored per row."""
    from pgolf.eval.ttt_base import lora_targets
    from pgolf.model import build_model
    from pgolf.model.attention import CAUSAL
    from pgolf.model.lora import BatchedLoRA

    tc = cfg.ttt
    B, S, C = tc.batch_size, tc.eval_seq_len, tc.chunk_size
    x = _packed_tokens(cfg, B, S)
    gi = torch.arange(S - C, S).repeat(B, 1)
    meta = build_model(cfg, "meta", attention_backend=kernel)
    with _fake(meta) as model:
        model.looping = bool(cfg.model.num_loops)
        for p in model.parameters():
            p.requires_grad_(False)
        lora = BatchedLoRA(model, B, tc.lora_rank, tc.lora_alpha, lora_targets(tc))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = model.forward_at(x[:, :-1], gi, lora=lora, mask=CAUSAL)
            torch.nn.functional.cross_entropy(z.flatten(0, 1), x[:, 1:].gather(1, gi).flatten()).backward()

        mem, flops = _tracked(step)
        adapters = sum(p.numel() * p.element_size() for p in lora.parameters())
    return {"batch": B, "window": S, "chunk": C, "flops_per_step": sum(flops.values()),
            "scored_per_step": B * C, "memory": {"adapters_and_adam": 3 * adapters, "activations": mem}}


def plan_gptq(cfg: Config, model_flops_per_token: float, model) -> dict[str, Any]:
    """Calibration forward (one third of forward + backward), Hessians X^T X of every quantised input,
    and the solve (a Cholesky inverse, cols^3, and the column sweep, 2 rows cols^2, per matrix)."""
    import torch.nn as nn

    q = cfg.quant
    tokens = q.calibration_batches * q.calibration_seqs * q.calibration_seq_len
    d = cfg.model.model_dim
    hidden = int(cfg.model.mlp_mult * d)
    visits = len(model.layer_order(bool(cfg.model.num_loops)))  # calibration runs with looping on
    per_token = visits * (3 * d * d + hidden * hidden) + d * d  # block inputs, attn out, MLP in, MLP hidden; head
    solve = sum(m.weight.shape[1] ** 3 + 2 * m.weight.shape[0] * m.weight.shape[1] ** 2
                for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() > q.passthrough_numel)
    solve += cfg.model.model_dim ** 3 + 2 * cfg.model.vocab_size * cfg.model.model_dim ** 2  # the tied embedding
    return {"calibration_tokens": tokens, "forward_flops": model_flops_per_token / 3 * tokens,
            "hessian_flops": 2.0 * per_token * tokens, "solve_flops": float(solve)}


def make_plan(cfg: Config, nproc: int, mfu: float, compile_backend: str = "eager") -> dict[str, Any]:
    from pgolf.compile_check import compile_check
    from pgolf.model import build_model, validate
    from pgolf.model.flash_ref import installed

    if not 0 < mfu <= 1:
        raise PgolfError(f"--mfu: {mfu} must be within (0, 1]")
    if nproc < 1:
        raise PgolfError(f"--nproc: {nproc} must be at least 1")
    validate(cfg.model)
    rate = H100_BF16_TFLOPS * 1e12 * mfu
    with installed("fa3") as kernel:
        train = plan_training(cfg, nproc, kernel)
        ttt = plan_ttt(cfg, kernel) if cfg.ttt.method == "lora" else None
    meta = build_model(cfg, "meta")
    modes = train["modes"]
    last = "looping_on" if "looping_on" in modes else "looping_off"  # the mode training ends and evaluates in
    ms = {m: 1000 * train["tokens_per_rank_step"] * v["flops_per_token"] / rate for m, v in modes.items()}
    components = {**train["state"], "activations": max(v["activations"] for v in modes.values())}
    peak = sum(components.values())
    out: dict[str, Any] = {
        "preset": cfg.preset, "nproc": nproc, "mfu": mfu, "device": "H100 (predicted)", "kernel": "fa3",
        "params": train["params"], "tokens_per_rank_step": train["tokens_per_rank_step"],
        "micro_batch_tokens": train["micro_batch_tokens"], "accum_steps": train["accum_steps"],
        "flops_per_token": modes[last]["flops_per_token"],
        "analytic_flops_per_token": modes[last]["analytic_flops_per_token"],
        "flops_per_token_by_mode": {m: v["flops_per_token"] for m, v in modes.items()},
        "predicted_ms_per_step": round(ms[last], 2),
        "predicted_ms_per_step_by_mode": {m: round(v, 2) for m, v in ms.items()},
        "peak_memory_gb_per_rank": round(peak / GB, 2),
        "memory_gb_per_rank": {k: round(v / GB, 3) for k, v in components.items()},
        "activations": "eager forward + backward (an upper bound on a compiled step)",
    }
    rec = MEASURED.get(cfg.preset)
    if rec is not None and rec["tokens_per_gpu_step"] == train["tokens_per_rank_step"]:  # the same GPU step
        out["measured"] = {**rec, "implied_mfu": {
            m: round(train["tokens_per_rank_step"] * modes[m]["flops_per_token"] / (t / 1000)
                     / (H100_BF16_TFLOPS * 1e12), 3) for m, t in rec["ms_per_step"].items() if m in modes}}
    if ttt is not None:
        secs = ttt["flops_per_step"] / rate
        mem = ttt["memory"]
        out["ttt"] = {**{k: ttt[k] for k in ("batch", "window", "chunk", "scored_per_step")},
                      "flops_per_step": ttt["flops_per_step"], "ms_per_chunk_step": round(1000 * secs, 2),
                      "scored_tokens_per_s_per_gpu": round(ttt["scored_per_step"] / secs),
                      "peak_memory_gb": round((train["state"]["parameters"] + sum(mem.values())) / GB, 2),
                      "memory_gb": {k: round(v / GB, 3) for k, v in mem.items()},
                      "note": "every chunk at the full window: the steady state of long documents"}
    if cfg.quant.method == "gptq":
        g = plan_gptq(cfg, modes[last]["flops_per_token"], meta)
        tf32 = H100_TF32_TFLOPS * 1e12 * mfu
        g["predicted_s"] = round(g["forward_flops"] / rate + (g["hessian_flops"] + g["solve_flops"]) / tf32, 2)
        out["gptq"] = g
    check = compile_check(cfg, backend=compile_backend)
    out["graph_breaks"], out["recompiles"] = check["graph_breaks"], check["recompiles"]
    out["compile_check"] = check
    return out


def table(p: dict[str, Any]) -> str:
    """The plan as lines for a terminal (stderr)."""
    mem = p["memory_gb_per_rank"]
    lines = [f"plan {p['preset']} on {p['nproc']} x H100 at MFU {p['mfu']:.2f} (predictions, CPU-computed)",
             f"  params {p['params']:,}; {p['tokens_per_rank_step']:,} tokens per rank per step "
             f"({p['accum_steps']} x {p['micro_batch_tokens']:,})",
             "  memory per rank (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
             + f" = {p['peak_memory_gb_per_rank']:.2f} (limit {LIMIT_GB:.0f})"]
    for m, f in p["flops_per_token_by_mode"].items():
        meas = p.get("measured", {}).get("ms_per_step", {}).get(m)
        lines.append(f"  {m}: {f / 1e6:.1f} MFLOP/token -> {p['predicted_ms_per_step_by_mode'][m]:.1f} ms/step"
                     + (f" (measured {meas} ms, implied MFU {p['measured']['implied_mfu'][m]:.2f})" if meas else ""))
    if "ttt" in p:
        t = p["ttt"]
        lines.append(f"  TTT: {t['ms_per_chunk_step']:.1f} ms per {t['batch']} x {t['window']} chunk step, "
                     f"{t['scored_tokens_per_s_per_gpu']:,} scored tokens/s/GPU, {t['peak_memory_gb']:.1f} GB")
    if "gptq" in p:
        g = p["gptq"]
        lines.append(f"  GPTQ: {g['calibration_tokens']:,} calibration tokens, {g['predicted_s']:.1f} s")
    lines.append(f"  compile check ({p['compile_check']['backend']}): {p['graph_breaks']} graph breaks, "
                 f"{p['recompiles']} recompiles")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from pgolf.presets import get_preset

    cfg = get_preset(args.preset, args.overrides)
    p = make_plan(cfg, args.nproc, args.mfu, args.compile_backend)
    print(table(p), file=sys.stderr)
    worst = max([p["peak_memory_gb_per_rank"]] + ([p["ttt"]["peak_memory_gb"]] if "ttt" in p else []))
    if worst > LIMIT_GB:
        raise PgolfError(f"plan: a rank would need {worst:.1f} GB (training {p['peak_memory_gb_per_rank']:.1f} GB: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in p["memory_gb_per_rank"].items())
                         + (f"; TTT {p['ttt']['peak_memory_gb']:.1f} GB" if "ttt" in p else "")
                         + f"), over the {LIMIT_GB:.0f} GB of an H100")
    return p


def cmd_params(args: Any) -> dict[str, Any]:
    """`pgolf params`: a preset's trainable parameters and, with --code-bytes, what its record script costs."""
    from pgolf.model import build_model, count_params
    from pgolf.presets import get_preset
    from pgolf.script.codebytes import code_bytes

    cfg = get_preset(args.preset, args.overrides)
    model = build_model(cfg, "meta")
    out = {"preset": args.preset, "params": count_params(model)}
    by = getattr(args, "breakdown", None)
    if getattr(args, "code_bytes", False) or by:  # the exported record script, as `pgolf quantize` counts it
        out.update({k: v for k, v in code_bytes(cfg).items() if k != "code_files"})
    if by:
        out["code_breakdown"] = _print_breakdown(cfg, by)
    return out


def _print_breakdown(cfg: Any, by: str) -> list[dict[str, Any]]:
    """The parts of the configuration's record script, dearest first, as a table on stderr."""
    from pgolf.script.bundle import build
    from pgolf.script.codebytes import breakdown

    info = breakdown(build(cfg).text, by)
    print(f"{'bytes':>7} {'minified':>9}  {by} (wrapped bytes the script would lose without it; they do not add up: "
          f"brotli shares repeats across parts)", file=sys.stderr)
    for row in info["parts"]:
        label = row["part"] if by == "module" else f"{row['part']}  [{row['module']}]"
        print(f"{row['bytes']:>7,} {row['minified']:>9,}  {label}", file=sys.stderr)
    print(f"{info['code_bytes']:>7,} {info['code_bytes_minified']:>9,}  the whole script (parts minified one by one: "
          f"{info['approx_code_bytes']:,})", file=sys.stderr)
    return info["parts"]
