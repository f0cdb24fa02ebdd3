"""Distributed equivalence (issue 12): a pr1855-shaped model at reduced width trains the same on 1, 2
and 4 gloo processes at the same global batch.

20 optimizer steps of the trainer's own step (pgolf.train.optimizer_step) with looping switched on half
way, the EMA, the 0.3 clip of the averaged gradient (`optim.grad_clip_scope=global`; the records' per-rank
clip is tested on its own below), and Muon sharded across ranks (Parallel Muon: reduce-scatter of the
gradient, each rank orthogonalising its shard, all-gather of the updates); then the EMA weights loaded
and one global-SGD phase of phased TTT, whose gradients are all-reduced across ranks. Micro-batch m of
each step goes to rank m % W, as the loader deals them. fp32 throughout (bf16 storage switches off), so
the only difference is the order of the sums: every point of the loss curve within 1e-5 relative.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_helpers import tiny_cfg

STEPS, MICRO, SEQ = 20, 4, 32  # optimizer steps; micro-batches per step (the global batch); max segment
ROW = 4 * SEQ  # one packed row of 128 tokens per micro-batch (data.segmentation = varlen, as pr1855)


def _cfg():
    return tiny_cfg("pr1855", "optim.muon_momentum_bf16=false", "model.tok_emb_bf16=false",
                    "optim.grad_reduce_bf16=false", "optim.grad_clip_scope=global", f"train.train_seq_len={SEQ}",
                    "ttt.global_chunk_tokens=256", "ttt.global_batch_seqs=2",
                    # one global-SGD step per chunk on any world: the record's procedure steps per micro-batch
                    # of each rank's share, so its steps depend on the world (test_phased_record_stream.py)
                    "ttt.global_procedure=packed")


def _rows(n: int, seed: int) -> torch.Tensor:
    """n packed rows of ROW + 1 tokens, a learnable chain (t -> 37 t + 11 mod 254) from random starts, with
    documents starting here and there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, ROW + 1, dtype=torch.int64)
    x[:, 0] = torch.randint(0, 254, (n,), generator=g)
    for t in range(1, ROW + 1):
        x[:, t] = (37 * x[:, t - 1] + 11) % 254
    x += 2
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:3 * n]] = 1
    return x


def curve(rank: int = 0, world: int = 1) -> tuple[list[float], int]:
    """The loss of every step (mean over the global batch), of the EMA weights, and after global SGD; and
    how many matrices this rank kept Muon momentum for."""
    from pgolf.distributed import all_reduce_mean_
    from pgolf.eval.phased import global_sgd
    from pgolf.model import build_model
    from pgolf.optim import EMA, build_optimizers
    from pgolf.train import optimizer_step

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizers(model, cfg.optim, tied=True)
    ema = EMA(model, cfg.optim.ema_decay)
    out = []
    for step in range(STEPS):
        model.looping = step >= STEPS // 2
        rows = _rows(MICRO, seed=step)[rank::world]  # micro-batch m on rank m % world
        loss = optimizer_step(model, model, opt, ema, [(r[None, :-1], r[None, 1:]) for r in rows],
                              cfg.optim.grad_clip_norm, 1.0, step, cfg.optim)
        all_reduce_mean_([loss])
        out.append(loss.item())
    ema.copy_to(model)
    probe = _rows(1, seed=99)
    with torch.no_grad():
        out.append(model(probe[:, :-1], probe[:, 1:]).item())
    stream = _scored_stream(4 * ROW)
    x = _rows(1, seed=7).view(-1).numpy()[: 4 * ROW + 1]
    global_sgd(model, x[:-1], x[1:], np.arange(4 * ROW), cfg.ttt, stream, seq_len=SEQ, rank=rank,
               world_size=world)
    with torch.no_grad():
        out.append(model(probe[:, :-1], probe[:, 1:]).item())
    return out, len(opt.optimizers["muon"].state)


def _scored_stream(n: int):
    """A ledger in which every target was scored (global SGD trains only on scored tokens)."""
    from pgolf.eval.trace import EvalStream

    stream = EvalStream(n)
    pos = np.arange(n)
    stream.record(pos, None, np.ones(n, np.float32), np.ones(n, np.int64))
    return stream


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        losses, owned = curve(rank, world)
        torch.save((losses, owned), os.path.join(out_dir, f"curve{world}-{rank}.pt"))
    finally:
        from pgolf.distributed import teardown
        teardown()  # destroys the group, then collects (see its docstring)


def test_two_and_four_ranks_give_the_single_process_loss_curve(tmp_path):
    single, matrices = curve()
    assert single[STEPS - 1] < 0.8 * single[0]  # it trains
    for world in (2, 4):
        mp.spawn(_worker, args=(world, str(tmp_path / f"init{world}"), str(tmp_path)), nprocs=world, join=True)
        runs = [torch.load(tmp_path / f"curve{world}-{r}.pt") for r in range(world)]
        for got, _ in runs:
            rel = np.abs(np.array(got) - np.array(single)) / np.abs(np.array(single))
            assert len(got) == STEPS + 2 and rel.max() <= 1e-5, (world, rel.max(), int(rel.argmax()))
        owned = [n for _, n in runs]  # Muon's momentum is sharded: each rank holds a part, together all
        assert sum(owned) == matrices and max(owned) < matrices, owned


LEAVE = '''
import atexit, sys
from pgolf.distributed import leave
atexit.register(lambda: print("shutdown ran", file=sys.stderr))
print("result line", end="")  # unflushed when leave() is called
leave(3)
'''


@pytest.mark.parametrize("world, shutdown", [("2", False), ("1", True)])
def test_a_torchrun_worker_leaves_without_the_interpreter_shutdown(world, shutdown):
    """`distributed.leave`: a worker of a multi-process job flushes its output and exits with its code
    without running the interpreter's shutdown (where gloo threads abort finished workers now and then);
    a single process exits the ordinary way."""
    env = {**os.environ, "WORLD_SIZE": world}
    p = subprocess.run([sys.executable, "-c", LEAVE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 3 and p.stdout == "result line"
    assert ("shutdown ran" in p.stderr) == shutdown


def _consensus_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from pgolf.train import step_consensus

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        clocks = (12.5, 13.75)  # each rank's own training clock: rank 1's runs ahead
        fine = step_consensus(torch.tensor(2.0), clocks[rank], rank == 0)
        nan_on_1 = step_consensus(torch.tensor(float("nan") if rank == 1 else 2.0), clocks[rank], rank == 0)
        torch.save((fine, nan_on_1), os.path.join(out_dir, f"consensus-{rank}.pt"))
    finally:
        from pgolf.distributed import teardown
        teardown()


def test_every_rank_takes_rank_0s_clock_and_sees_a_divergence_anywhere(tmp_path):
    """The trainer's per-step consensus: each rank's own clock drifts (rank 0 logs between steps), and
    ranks that read their own clock switched depth recurrence on different steps (different graphs; with
    a learned carry, a gradient on some ranks only). Every rank now gets rank 0's clock, and a loss that
    is not finite on one rank stops them all."""
    mp.spawn(_consensus_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"consensus-{r}.pt") for r in range(2)]
    assert got[0] == got[1] == ((False, 12.5), (True, 12.5))
    from pgolf.train import step_consensus
    assert step_consensus(torch.tensor(1.0), 3.25, True) == (False, 3.25)  # one process: its own clock


def _clip_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from pgolf.config import OptimConfig
    from pgolf.optim.groups import build_optimizers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = {}
        for scope in ("global", "rank"):
            model = torch.nn.Linear(4, 3)  # weight: Muon (rank 0 holds its averaged rows); bias: AdamW
            opt = build_optimizers(model, OptimConfig(grad_clip_scope=scope), tied=False)
            g = _local_grads(rank)
            model.weight.grad, model.bias.grad = g[0].clone(), g[1].clone()
            opt.reduce_and_clip(0.3)
            held = opt.optimizers["muon"]._held()
            got[scope] = (held[model.weight].clone() if model.weight in held else None, model.bias.grad.clone())
        torch.save(got, os.path.join(out_dir, f"clip-{rank}.pt"))
    finally:
        from pgolf.distributed import teardown
        teardown()


def _local_grads(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own gradient of (weight, bias): rank 1's is large and points another way."""
    g = torch.Generator().manual_seed(rank)
    return torch.randn(3, 4, generator=g) * (0.1, 2.0)[rank], torch.randn(3, generator=g) * (0.1, 2.0)[rank]


def _clipped(gs: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    norm = torch.cat([g.reshape(-1) for g in gs]).norm()
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in gs]


def test_each_rank_clips_its_own_gradient_before_the_average_with_rank_scope(tmp_path):
    """`optim.grad_clip_scope`: "global" clips the averaged gradient (the single-process clip); "rank"
    clips each rank's own gradient, then averages, as the #1530-line records (no DDP: their step_fn calls
    clip_grad_norm_ on the local gradients before Optimizers.step all-reduces them). Worked out here
    from the two ranks' gradients."""
    mp.spawn(_clip_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"clip-{r}.pt") for r in range(2)]
    g = [_local_grads(r) for r in range(2)]
    mean = [(g[0][i] + g[1][i]) / 2 for i in range(2)]
    want_global = _clipped(mean, 0.3)
    per_rank = [_clipped(list(g[r]), 0.3) for r in range(2)]
    want_rank = [(per_rank[0][i] + per_rank[1][i]) / 2 for i in range(2)]
    for scope, want in (("global", want_global), ("rank", want_rank)):
        assert got[1][scope][0] is None  # Parallel Muon: one matrix, held by rank 0
        torch.testing.assert_close(got[0][scope][0], want[0], rtol=1e-5, atol=1e-7)
        for r in range(2):
            torch.testing.assert_close(got[r][scope][1], want[1], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(want_global[1], want_rank[1], rtol=1e-2)  # the two rules differ here
