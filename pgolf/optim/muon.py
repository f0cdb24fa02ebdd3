"""Muon: momentum + Newton-Schulz orthogonalisation for the 2-D weight matrices.

Written from the description in docs/records/record-stack.md §3.3 and docs/records/hedge-stack.md §1.3 (Muon by Keller
Jordan, modded-nanogpt). pgolf keeps projections as separate `nn.Linear`s, so instead of the records'
3-D banks this optimizer stacks same-shape matrices itself into banks (Q with O, K with V, MLP up,
MLP down: the records' four) and orthogonalises each bank in one batched call.

Under torch.distributed it is the records' Parallel Muon (docs/records/record-stack.md §3.3): each bank's gradient
is reduce-scattered along its stack, padded to a multiple of the world size, so every rank holds the
averaged gradient of its own contiguous shard of matrices; it keeps momentum for that shard only,
orthogonalises it, and the updates are all-gathered, so every rank applies the same update. The math is
the single-process math: the gradient is averaged before momentum, and a global norm clip can scale the
shards in between (`reduce_grads`, `shard_sq_norm`, `scale_grads_`; pgolf.optim.groups does it).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

# The quintic that every record before #1787 used, five times.
CLASSIC = (3.4445, -4.7750, 2.0315)

# Polar Express, PR #1344 -> #1787: one (a, b, c) per iteration, in this order.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(steps: int, coeffs: str = "classic") -> list[tuple[float, float, float]]:
    """The (a, b, c) of each Newton-Schulz iteration.

    Polar Express has exactly five tuples: fewer steps use the first ones; more steps still run
    each tuple once (docs/records/record-stack.md §3.3), i.e. at most five iterations.
    """
    if coeffs == "classic":
        return [CLASSIC] * steps
    if coeffs == "polar_express":
        return list(POLAR_EXPRESS[:steps])
    raise ValueError(f"unknown Newton-Schulz coefficients {coeffs!r} (classic | polar_express)")


def ns_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, as in the records. CPUs without bf16 matmul units run it ~20x slower than
    fp32, which would make Muon dominate a CPU smoke run, so CPU iterates in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def zeropower(G: torch.Tensor, steps: int = 5, coeffs: str = "classic",
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of G (..., m, n) with Newton-Schulz.

    Leading dimensions are a batch. Runs in `dtype` (default `ns_dtype_for(G.device)`) and
    returns that dtype.
    """
    X = G.to(dtype or ns_dtype_for(G.device))
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side: A = X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm
    for a, b, c in ns_coefficients(steps, coeffs):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


@functools.cache
def compiled_zeropower(backend: str = "inductor"):
    """`zeropower` under torch.compile, one graph per bank shape (a run has a handful: dynamo's limit of
    8 is not reached), shared by every Muon of the process."""
    return torch.compile(zeropower, dynamic=False, fullgraph=True, backend=backend)


def _grads(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of a bank's parameters (a bank holds only parameters that have one)."""
    return [g for p in ps if (g := p.grad) is not None]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shape_scale(p: torch.Tensor) -> float:
    """max(1, rows/cols)^(1/2): 2 for a (2048, 512) MLP-up, 1 for square and wide matrices."""
    return max(1.0, p.size(-2) / p.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon for parameters with ndim >= 2 (the last two dims are the matrix).

    Per parameter: Nesterov momentum (`buf <- mu*buf + g; u = g + mu*buf`), optional MuonEq-R row
    normalisation of u (PR #1285/#1334), Newton-Schulz, then decoupled weight decay
    `p <- p*(1 - lr*wd)` and `p <- p - lr*max(1, rows/cols)^(1/2) * X`.
    The momentum is a group value the caller sets each step (warm-up lives in `OptimizerSet`).
    Gradients must already be averaged across ranks. `ns_dtype` None = `ns_dtype_for(device)`.
    `momentum_dtype` None keeps the buffer in the gradient's dtype; bf16 casts the gradient and
    keeps the buffer and the Nesterov update in bf16, as the records' banked Muon (docs/records/record-stack.md §3.3).
    `reduce_dtype` None reduce-scatters the gradient in its own dtype; bf16 casts it to bf16 first and sums
    in bf16, as record #1855's `launch_reduce_scatters` (the rows held, and so the momentum, are then bf16).
    `compile_ns`: a torch.compile backend for Newton-Schulz (the trainer passes "inductor" on CUDA with
    `train.compile`, as the records compile `zeropower_via_newtonschulz5`: fused, and rounded as theirs),
    None for eager.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, backend_steps: int = 5, coeffs: str = "classic",
                 row_normalize: bool = False, ns_dtype: torch.dtype | None = None,
                 momentum_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                 compile_ns: str | None = None):
        ns_coefficients(0, coeffs)  # validate the name early
        self.zeropower = compiled_zeropower(compile_ns) if compile_ns else zeropower
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        backend_steps=backend_steps, coeffs=coeffs, row_normalize=row_normalize,
                        ns_dtype=ns_dtype, momentum_dtype=momentum_dtype, reduce_dtype=reduce_dtype)
        super().__init__(params, defaults)
        self._shards: dict[torch.Tensor, torch.Tensor] | None = None  # set by reduce_grads, used by step
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon needs matrices; got a parameter of shape {tuple(p.shape)}")

    def _banks(self) -> list[tuple[dict, list[torch.Tensor]]]:
        """(group, same-shape params with a gradient) in a fixed order: the same on every rank."""
        banks = []
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), p.dtype), []).append(p)
            banks += [(group, ps) for ps in buckets.values()]
        return banks

    def reduce_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Reduce-scatter each bank's gradient (the mean over ranks): this rank keeps its shard's rows.
        In a single process the shard is the whole gradient. `step` calls it when the caller has not.
        Returns the rows this rank holds, per parameter."""
        world, rank = _world()
        shards: dict[torch.Tensor, torch.Tensor] = {}
        self._shards = shards
        for group, ps in self._banks():
            grads = _grads(ps)
            if world == 1:
                shards.update(zip(ps, grads))
                continue
            n = -(-len(ps) // world)  # matrices per rank; the stack is padded to n * world
            stack = torch.stack(grads).to(group.get("reduce_dtype") or grads[0].dtype)
            stack = torch.cat([stack, stack.new_zeros(n * world - len(ps), *stack.shape[1:])])
            shard = stack.new_empty(n, *stack.shape[1:])
            dist.reduce_scatter_tensor(shard, stack)  # SUM: gloo has no AVG
            shard.mul_(1.0 / world)
            shards.update(zip(ps[rank * n:(rank + 1) * n], shard))
        return shards

    def _held(self) -> dict[torch.Tensor, torch.Tensor]:
        """The gradient rows this rank holds: reduce_grads' (run now when the caller has not)."""
        return self.reduce_grads() if self._shards is None else self._shards

    def shard_sq_norm(self) -> torch.Tensor:
        """Sum of squares (fp32) of the averaged gradient rows this rank holds: summed over ranks, the
        Muon part of the global gradient norm."""
        dev = self.param_groups[0]["params"][0].device
        return sum((g.float().pow(2).sum() for g in self._held().values()), torch.zeros((), device=dev))

    def scale_grads_(self, coef: torch.Tensor) -> None:
        """Multiply the gradient rows this rank holds by `coef` (a clip coefficient)."""
        held = self._held()
        if held:
            torch._foreach_mul_(list(held.values()), coef)

    def _orthogonalise(self, group: dict, ps: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        dt = group.get("momentum_dtype")
        grads = [g if dt is None else g.to(dt) for g in grads]
        bufs = []
        for p, g in zip(ps, grads):
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(g)
            elif st["momentum_buffer"].dtype != g.dtype:  # load_state_dict casts state to the param's dtype
                st["momentum_buffer"] = st["momentum_buffer"].to(g.dtype)
            bufs.append(st["momentum_buffer"])
        mu = group["momentum"]
        if dt is None:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)
            us = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs
        else:  # tensor by tensor, as the record: CPU foreach rounds the scalar mu to bf16 first
            for b, g in zip(bufs, grads):
                b.mul_(mu).add_(g)
            us = [g.add(b, alpha=mu) for g, b in zip(grads, bufs)] if group["nesterov"] else bufs
        U = torch.stack(us)  # (k, ..., rows, cols)
        if group["row_normalize"]:  # MuonEq-R: unit rows *before* orthogonalising (norms in fp32)
            U = U / U.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(U.dtype)
        return self.zeropower(U, group["backend_steps"], group["coeffs"], group["ns_dtype"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world, rank = _world()
        held = self._held()
        for group, ps in self._banks():
            if world == 1:
                updates = self._orthogonalise(group, ps, [held[p] for p in ps])
            else:  # this rank's shard, then every rank's shard gathered (padding rows are zeros)
                n = -(-len(ps) // world)
                mine = ps[rank * n:(rank + 1) * n]
                dtype = group["ns_dtype"] or ns_dtype_for(ps[0].device)
                shard = ps[0].new_zeros(n, *ps[0].shape, dtype=dtype)
                if mine:
                    shard[:len(mine)] = self._orthogonalise(group, mine, [held[p] for p in mine])
                updates = shard.new_empty(n * world, *ps[0].shape)
                dist.all_gather_into_tensor(updates, shard)
            lr, wd = group["lr"], group["weight_decay"]
            for p, u in zip(ps, updates):
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr * shape_scale(p))
        self._shards = None
        return loss
