"""Distributed Muon: two gloo CPU processes end with the same parameters as one process.

Each rank orthogonalises its shard of every bank of same-shape matrices (reduce-scatter of the
gradients, Parallel Muon) and the updates are all-gathered: both ranks must end bitwise identical, and
equal to the single-process result.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.distributed import teardown
from pgolf.optim import Muon

SHAPES = [(8, 16), (16, 8), (8, 16), (4, 4), (8, 16), (16, 8), (12, 4)]
STEPS = 3


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def _run(params):
    """A few Muon steps on fixed gradients (as if already averaged over ranks)."""
    # group 2 runs the records' bf16 Newton-Schulz, group 1 the CPU default fp32
    groups = [{"params": params[:5]},
              {"params": params[5:], "weight_decay": 0.0, "ns_dtype": torch.bfloat16}]
    opt = Muon(groups, lr=0.05, momentum=0.9, weight_decay=0.1, row_normalize=True, coeffs="polar_express")
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # two ranks on two shared cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = _params()
        opt = _run(params)
        owned = [i for i, p in enumerate(params) if p in opt.state]
        torch.save({"params": [p.detach() for p in params], "owned": owned},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown()  # destroys the group, then collects (see its docstring)


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    # the work was really split: each rank kept momentum only for its own share, together all
    assert r0["owned"] and r1["owned"]
    assert sorted(r0["owned"] + r1["owned"]) == list(range(len(SHAPES)))

    ref = _params()
    _run(ref)
    for a, b, want, init in zip(r0["params"], r1["params"], ref, _params()):
        assert torch.equal(a, b)  # identical on every rank
        assert (a - init).abs().max() > 1e-3  # and they did move
        torch.testing.assert_close(a, want.detach(), rtol=0, atol=1e-6)


# ---- optim.grad_reduce_bf16: the average over ranks in bf16, as record #1855 (docs/fidelity.md)

U = 2.0 ** -7  # bf16's spacing in [1, 2)
# per rank: Muon's fp32 gradient (not bf16 values: the cast before the sum matters), tok_emb's bf16
# gradient (bf16 values whose bf16 sum is 2 in any order of the additions; exactly it is 2 + U + U/4),
# and an fp32 bias (not bf16 values: it must stay fp32)
MUON_G = (1 + 0.625 * U, -(1 + 0.25 * U), 0.0, 0.0)
EMB_G = (1.0, 1 + U, U / 4, 0.0)
BIAS_G = tuple(1 + r * 2.0 ** -12 for r in range(4))


def _bf16_worker(rank, world, init_file, out_dir):
    from pgolf.config import OptimConfig
    from pgolf.optim import build_optimizers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = {}
        for on in (False, True):
            model = torch.nn.Module()
            model.w = torch.nn.Linear(3, 2)  # weight: Muon (one matrix: rank 0 holds it); bias: AdamW scalar
            model.tok_emb = torch.nn.Embedding(2, 3).to(torch.bfloat16)  # as model.tok_emb_bf16
            opt = build_optimizers(model, OptimConfig(grad_clip_scope="rank", grad_reduce_bf16=on), tied=True)
            model.w.weight.grad = torch.full((2, 3), MUON_G[rank])
            model.w.bias.grad = torch.full((2,), BIAS_G[rank])
            model.tok_emb.weight.grad = torch.full((2, 3), EMB_G[rank], dtype=torch.bfloat16)
            opt.reduce_and_clip(0.0)
            held = opt.optimizers["muon"]._held()
            got[on] = (held.get(model.w.weight), model.tok_emb.weight.grad, model.w.bias.grad)
        torch.save(got, os.path.join(out_dir, f"bf16-{rank}.pt"))
    finally:
        teardown()
    os._exit(0)  # saved and torn down: skip the interpreter's shutdown (seconds for 4 ranks on 2 cores)


def test_grad_reduce_bf16_averages_in_bf16_as_the_record(tmp_path):
    """On, Muon's gradient is rounded to bf16 before the sum (the record copies p.grad into its bf16
    padded_grad): 1 + 5U/8 and -(1 + U/4) round to 1 + U and -1, so the mean is U/4 = 2^-9 where the fp32
    mean is 3U/32; tok_emb's bf16 gradient is summed in bf16, 2 and not 2 + U + U/4, so the mean is 0.5
    where the fp32 mean rounded once is 0.5 + U/2; the fp32 bias stays an fp32 mean. Off, everything is
    the fp32 mean, as before. 4 ranks: with 2 a bf16 sum of bf16 values rounds once, as the fp32 mean
    copied back to bf16 does."""
    from pgolf.presets import get_preset

    assert get_preset("pr1855").optim.grad_reduce_bf16 and not get_preset("cpu-smoke").optim.grad_reduce_bf16
    mp.spawn(_bf16_worker, args=(4, str(tmp_path / "init"), str(tmp_path)), nprocs=4, join=True)
    got = [torch.load(tmp_path / f"bf16-{r}.pt") for r in range(4)]
    assert all(g[on][0] is None for g in got[1:] for on in (False, True))  # rank 0 holds the matrix
    bias = torch.full((2,), 1 + 1.5 * 2.0 ** -12)  # not a bf16 value
    want = {False: (torch.full((2, 3), 0.09375 * U), torch.full((2, 3), 0.5 + U / 2, dtype=torch.bfloat16)),
            True: (torch.full((2, 3), U / 4, dtype=torch.bfloat16), torch.full((2, 3), 0.5, dtype=torch.bfloat16))}
    for on, (muon, emb) in want.items():
        assert got[0][on][0].dtype == muon.dtype and torch.equal(got[0][on][0], muon), on
        for r in range(4):
            assert torch.equal(got[r][on][1], emb) and torch.equal(got[r][on][2], bias), (on, r)
