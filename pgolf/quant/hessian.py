"""GPTQ calibration: input Hessians H = sum(x x^T) / n of every quantised linear layer.

Calibration windows come from the TRAINING shards only (`pgolf.data.loader.calibration_batches`,
docs/records/record-stack.md §4.2); validation is never read. The forward is the model's one forward
(`model.hidden`, looping as configured), so looped layers accumulate every visit. With
`quant.calibration_doc_mask` off, attention is dense causal over each window whatever
`model.doc_mask` says: the #1530-line records' `collect_hessians` calls `forward_logits(x)` without
cu_seqlens. Hooks record:
- each `nn.Linear` whose weight is large enough to be quantised (q/k/v/o, MLP fc/proj, an untied
  head): its input;
- the tied embedding as the output head: the final normalised hidden state (the head's input).
H is the sum over the calibration batches divided by their number, for looped layers too, in fp32 on
the model's device: the #1530-line records' `collect_hessians` (`hessians[name] / n_calibration_batches`).
GPTQ does not depend on H's scale in exact arithmetic (damping is relative to the mean diagonal), but
in fp32 it does: with the record's scale, pgolf's GPTQ gave the record's integers bit for bit on the
CPU in session 8's comparison (with H divided by the rows instead, 0.4% of a 512 x 512 matrix's integers
differed; docs/fidelity.md).
Results are cached in the run directory (`hessians.pt`), keyed by a hash of the calibration settings
and the weights file, so sweeps compute them once.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pgolf.model.gpt import GPT

CACHE = "hessians.pt"


def _autocast(device: torch.device):
    from pgolf.eval.score import autocast_for

    return autocast_for(device)


@torch.no_grad()
def collect_hessians(model: GPT, batches, *, min_numel: int = 65_536,
                     doc_mask: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: H (in, in) fp32} for every Linear with weight.numel() > min_numel, and
    `tok_emb.weight` (from the head input) when the embedding is tied. `doc_mask` False switches the
    model's document masking off for the calibration forward."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if key not in sums:
            sums[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        sums[key].addmm_(x.T, x)

    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight.numel() > min_numel:
            hooks.append(mod.register_forward_hook(lambda m, inp, out, key=f"{name}.weight": add(key, inp[0])))
    mcfg: Any = getattr(model, "cfg", None)  # None for a bare module with `hidden` (tests)
    tied = getattr(mcfg, "tie_embeddings", False)
    unmask = getattr(mcfg, "doc_mask", False) and not doc_mask  # the model's own switch, off for a while
    was_training = model.training
    model.eval()
    if unmask:
        mcfg.doc_mask = False
    n = 0
    try:
        for idx in batches:
            n += 1
            with _autocast(device):
                h = model.hidden(idx.to(device))  # (B, T, d): the head's input
            # the head is applied with F.linear inside GPT.logits, so no hook sees its input
            add("tok_emb.weight" if tied else "lm_head.weight", h)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
        if unmask:
            mcfg.doc_mask = True
    return {k: sums[k] / max(n, 1) for k in sums}


def calibration_key(cfg, weights: Path, world_size: int = 1) -> str:
    """Hash of everything the Hessians depend on: data, windows (and the shards rank 0 of `world_size`
    draws them from), seed, looping and the weights."""
    st = weights.stat()
    q = cfg.quant
    blob = json.dumps({"data": str(Path(cfg.data.path).resolve()), "world_size": world_size,
                       "batches": q.calibration_batches,
                       "seqs": q.calibration_seqs, "seq_len": q.calibration_seq_len, "seed": q.calibration_seed,
                       "looping": bool(cfg.model.num_loops), "min_numel": q.passthrough_numel,
                       "doc_mask": cfg.model.doc_mask and q.calibration_doc_mask, "scale": "per batch",
                       "weights": [weights.name, st.st_size, st.st_mtime_ns]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def calibrate(model: GPT, cfg, *, rank: int = 0, world_size: int = 1) -> tuple[dict, dict]:
    """Draw calibration windows from the train shards and collect Hessians; timed. A run on
    `world_size` ranks calibrates as its rank 0 (the records keep rank 0's artifact): from
    files[0::world_size] (`pgolf.data.loader.calibration_batches`)."""
    from pgolf.data.loader import calibration_batches

    q = cfg.quant
    t0 = time.perf_counter()
    batches = calibration_batches(cfg.data.path, q.calibration_batches, q.calibration_seqs,
                                  q.calibration_seq_len, seed=q.calibration_seed, rank=rank, world_size=world_size)
    t1 = time.perf_counter()
    H = collect_hessians(model, batches, min_numel=q.passthrough_numel, doc_mask=q.calibration_doc_mask)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    info = {"calibration_data_seconds": t1 - t0, "hessian_seconds": t2 - t1, "world_size": world_size,
            "calibration_tokens": sum(b.numel() for b in batches), "hessians": len(H)}
    return H, info


def cached_hessians(run_dir: str | Path, model: GPT | Callable[[], GPT], cfg, weights: str = "final_model.pt",
                    caller: str = "quantize", write: bool = True) -> tuple[dict, dict]:
    """Hessians from `<run>/hessians.pt` when the key matches, else computed and (with `write`) cached
    there. `model` is the model, or a function building it (only called on a cache miss).

    The trainer calls this right after saving the weights (caller="train"), inside the
    `train.gptq_reserve_seconds` its loop left free (docs/records/record-stack.md §3.9); the info records how long
    calibration took against that reserve. Computed later by `pgolf quantize`, it is outside the
    training budget and says so (`computed_by`); quantize passes write=False and stores the cache with
    `write_cache` only when it publishes its results, so a failed run leaves the run directory as it was.
    """
    run_dir = Path(run_dir)
    world = run_world_size(run_dir)  # the trainer wrote it before training
    key = calibration_key(cfg, run_dir / weights, world)
    path = run_dir / CACHE
    if path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("key") == key:
                return obj["hessians"], {**obj["info"], "cached": True}
        except (RuntimeError, EOFError, KeyError, AttributeError):
            pass  # a stale or broken cache is recomputed
    H, info = calibrate(model if isinstance(model, GPT) else model(), cfg, world_size=world)
    spent = info["calibration_data_seconds"] + info["hessian_seconds"]
    info.update(computed_by=caller, reserve_seconds=cfg.train.gptq_reserve_seconds,
                within_reserve=caller == "train" and spent <= cfg.train.gptq_reserve_seconds)
    if write:
        write_cache(run_dir, cfg, H, info, weights)
    return H, {**info, "cached": False}


def run_world_size(run_dir: Path) -> int:
    """The number of ranks the run trained on (env.json), 1 when it does not say."""
    try:
        world = json.loads((run_dir / "env.json").read_text()).get("world_size", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return world if isinstance(world, int) and world >= 1 else 1


def write_cache(run_dir: str | Path, cfg, H: dict, info: dict, weights: str = "final_model.pt") -> None:
    """Store Hessians computed by `cached_hessians` as `<run>/hessians.pt` (atomically)."""
    from pgolf.fileio import atomic_write_bytes

    run_dir = Path(run_dir)
    buf = io.BytesIO()
    info = {k: v for k, v in info.items() if k != "cached"}
    key = calibration_key(cfg, run_dir / weights, info.get("world_size", 1))
    torch.save({"key": key, "hessians": {k: v.cpu() for k, v in H.items()}, "info": info}, buf)
    atomic_write_bytes(run_dir / CACHE, buf.getvalue())
