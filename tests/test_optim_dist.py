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
