"""The compile check: a preset's training step and LoRA TTT step traced whole on the CPU (issue 12).

It answers, without a GPU, the two questions a first H100 run would: does the compiled forward break
the graph (torch.compile with fullgraph=True makes any break an error), and does it recompile once
warmed up? The preset runs at a reduced size with every switch it sets and its looping structure
(the loop's span and passes, the two lanes, U-Net skips, XSA, gates, carry) but only one plain layer
before the loop and two after it (tracing costs per virtual layer: the full-depth check of all eight
presets took minutes on the 2-core CI machine), through the kernel an H100 runs: FlashAttention-3,
here the stand-in of pgolf.model.flash_ref, under bf16 autocast.

- training (pgolf.model.compile.compile_train): one warm-up step in each looping mode, as the
  trainer's warm-up; then steps in both modes again with other documents per row (the packed row's
  cu_seqlens crosses a 64-entry bucket). Any new graph there is a recompile.
- TTT (compile_ttt): warmed up at the full context and at one chunk (docs/records/record-stack.md §5.1); then
  windows and chunk lengths as LoRA TTT cuts them, and fresh adapters. Any new graph is a recompile.

`graph_breaks` counts the breaks torch._dynamo.explain finds when the fullgraph trace failed (0 when
it succeeded). The backend is dynamo's "eager" by default: breaks and recompiles are decided by the
dynamo trace; "aot_eager" also traces the backward with fake tensors at about 3x the time; "inductor"
(`pgolf plan --compile-backend inductor`) lowers and builds the steps as a GPU run would, with C++
kernels in place of Triton (minutes for pr1855: docs/perf.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable

import torch

from pgolf.config import Config, ModelConfig

WIDTH = 64  # 4 heads of 16; vocabulary 256; training rows of 64 tokens; TTT windows up to 128
SEQ, PACKED, TTT_SEQ, TTT_CHUNK, TTT_BATCH = 64, 256, 128, 16, 4


def check_config(cfg: Config) -> Config:
    """`cfg` at the compile check's size: the same switches and looping structure, fewer plain layers."""
    c = Config.from_dict(cfg.to_dict())
    m = c.model
    kv = 4 if m.num_kv_heads == m.num_heads else 2  # MHA stays MHA, GQA stays GQA
    m.model_dim, m.num_heads, m.num_kv_heads, m.vocab_size, m.mlp_mult = WIDTH, 4, kv, 256, 2.0
    m.rope_dims = min(m.rope_dims, 8)  # partial RoPE stays partial
    if m.bigram_buckets:
        m.bigram_buckets, m.bigram_dim = 64, 16
    if m.ve_dim:
        m.ve_dim = 16
    _trim_depth(m)
    t = c.train
    t.train_seq_len = t.eval_seq_len = SEQ
    t.micro_batch_tokens, t.train_batch_tokens = PACKED, PACKED
    tt = c.ttt
    tt.eval_seq_len, tt.chunk_size, tt.batch_size, tt.lora_rank = TTT_SEQ, TTT_CHUNK, TTT_BATCH, 4
    return c


def _trim_depth(m: ModelConfig) -> None:
    """Keep one layer before the loop (three without one) and two after it; lanes, XSA and value
    embeddings keep their places counted from the last layer."""
    from pgolf.model.gpt import validate

    L = m.num_layers
    if m.num_loops:
        pre, span, post = min(m.loop_start, 1), m.loop_end - m.loop_start + 1, min(L - m.loop_end - 1, 2)
        new = pre + span + post
        m.loop_start, m.loop_end = pre, pre + span - 1
    else:
        new = min(L, 3)
    before = dataclasses.replace(m)
    m.num_layers = new
    if m.parallel_start_layer >= 0:
        m.parallel_start_layer = max(new - (L - m.parallel_start_layer), new - 2)
    m.xsa_last_n = min(m.xsa_last_n, new)
    m.ve_layers = [layer - L + new for layer in m.ve_layers if layer - L + new >= 0]
    try:
        validate(m)
    except Exception:  # a structure the trim cannot keep: check it at full depth
        for f in dataclasses.fields(m):
            setattr(m, f.name, getattr(before, f.name))


def compile_check(cfg: Config, *, backend: str = "eager", ttt: bool | None = None,
                  cached: bool = True) -> dict[str, Any]:
    """{"graph_breaks", "recompiles", ...} of `cfg` at the check's size (see the module docstring).

    `ttt` None: the TTT step too when the preset's TTT method is LoRA. Results are cached per config
    in this process (`cached=False` for a check whose code was patched)."""
    c = check_config(cfg)
    with_ttt = c.ttt.method == "lora" if ttt is None else ttt
    key = json.dumps({**c.to_dict(), "preset": ""}, sort_keys=True)
    run = _cached_check if cached else _check
    return dict(run(key, backend, with_ttt))


@functools.cache
def _cached_check(key: str, backend: str, with_ttt: bool) -> tuple:
    return tuple(_check(key, backend, with_ttt).items())


def _check(key: str, backend: str, with_ttt: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from pgolf.model import build_model
    from pgolf.model.flash_ref import installed

    cfg = Config.from_dict(json.loads(key))
    t0 = time.perf_counter()
    torch._dynamo.reset()  # a clean code cache: entries left by other configs would hide recompiles
    counters.clear()
    out: dict[str, Any] = {"backend": backend}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with installed("fa3") as kernel:
            torch.manual_seed(0)
            model = build_model(cfg, attention_backend=kernel)
            out["kernel"] = kernel
            for name, phase in (("train", _train_phase), ("ttt", _ttt_phase)):
                if name == "ttt" and not with_ttt:
                    continue
                out.update(_run_phase(name, phase, model, cfg, backend, counters))
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    phases = ["train", "ttt"] if with_ttt else ["train"]
    out["graph_breaks"] = sum(out.get(f"{p}_graph_breaks", 0) for p in phases)
    out["break_reasons"] = [r for p in phases for r in out.pop(f"{p}_break_reasons", [])]
    measured = [out[f"{p}_recompiles"] for p in phases if f"{p}_recompiles" in out]
    out["recompiles"] = sum(measured) if len(measured) == len(phases) else None  # None: a trace failed
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _run_phase(name: str, phase: Callable, model, cfg: Config, backend: str, counters) -> dict[str, Any]:
    """Warm up, then measure: new graphs after the warm-up are recompiles; a failed trace is explained."""
    warm, measure, explain = phase(model, cfg, backend)
    out: dict[str, Any] = {}
    start = counters["stats"]["unique_graphs"]
    try:
        warm()
        warmed = counters["stats"]["unique_graphs"]
        measure()
        out[f"{name}_graphs"] = warmed - start
        out[f"{name}_recompiles"] = counters["stats"]["unique_graphs"] - warmed
    except torch._dynamo.exc.TorchDynamoException as e:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ex = explain()
        breaks = max(ex.graph_break_count, 1)
        reasons = [str(r.reason).splitlines()[0] for r in ex.break_reasons] or [str(e).splitlines()[0]]
        out[f"{name}_graph_breaks"], out[f"{name}_break_reasons"] = breaks, reasons[:3]
    return out


def _train_phase(model, cfg: Config, backend: str):
    from pgolf.model.compile import compile_train

    step_fn = compile_train(model, backend)
    packed = cfg.data.segmentation == "varlen"
    few, many = _batch(cfg, packed, 3, seed=1), _batch(cfg, packed, 70, seed=2)
    modes = [False, True] if cfg.model.num_loops else [False]

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    def run(batches):
        for looping in modes:
            model.looping = looping
            for x in batches:
                step(x)

    def explain():
        model.looping = modes[-1]
        x = few[:, :-1]
        return torch._dynamo.explain(model)(x, few[:, 1:], mask=model.attention_mask(x))

    return (lambda: run([few]), lambda: run([few, many]), explain)


def _batch(cfg: Config, packed: bool, n_bos: int, seed: int) -> torch.Tensor:
    """Training rows (one packed row of PACKED tokens, or rows of SEQ) with `n_bos` documents starting."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, PACKED + 1) if packed else (PACKED // SEQ, SEQ + 1)
    x = torch.randint(2, cfg.model.vocab_size, shape, generator=g)
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_bos]] = cfg.data.bos_id
    return x


def _ttt_phase(model, cfg: Config, backend: str):
    """LoRA TTT's step (pgolf.eval.lora_ttt): adapters, the compiled forward_at on rows that are single
    documents, CE on the chunk's positions, backward into the adapters only."""
    from pgolf.eval.ttt_base import lora_targets
    from pgolf.model.attention import CAUSAL
    from pgolf.model.compile import compile_ttt
    from pgolf.model.lora import BatchedLoRA

    tc = cfg.ttt
    S, C, B, V = tc.eval_seq_len, tc.chunk_size, tc.batch_size, cfg.model.vocab_size
    model.looping = bool(cfg.model.num_loops)  # looping stays on for evaluation
    for p in model.parameters():
        p.requires_grad_(False)
    fwd = compile_ttt(model, backend)
    g = torch.Generator().manual_seed(3)

    def lora():
        return BatchedLoRA(model, B, tc.lora_rank, tc.lora_alpha, lora_targets(tc))

    adapters = lora()

    def step(W: int, K: int, adapters=adapters, update: bool = True):
        """Score a chunk (with grad), then update (not on a batch's last chunk)."""
        x = torch.randint(2, V, (B, W + 1), generator=g)
        gi = torch.arange(W - K, W).repeat(B, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = fwd(x[:, :-1], gi, lora=adapters, mask=CAUSAL)
        if update:
            nll = -torch.log_softmax(z, -1).gather(-1, x[:, 1:].gather(1, gi)[..., None])
            nll.mean().backward()

    def warm():  # as ttt_base.warmup: the full context, then one chunk
        step(S, C)
        step(C, C)

    def measure():
        for W, K in ((2 * C, C), (S, C // 2 + 1), (C + 3, 5), (S - 1, 2)):
            step(W, K)
        step(S, 3, update=False)
        step(3 * C, C, adapters=lora())  # fresh adapters (a new phase) reuse the graph

    def explain():
        x = torch.randint(2, V, (B, S))
        return torch._dynamo.explain(model.forward_at)(x, torch.arange(S - C, S).repeat(B, 1), lora=adapters,
                                                       mask=CAUSAL)

    return (warm, measure, explain)
