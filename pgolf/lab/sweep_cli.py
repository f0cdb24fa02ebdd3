"""`pgolf sweep`: the command line of the two launchers, `pgolf.lab.sweep` (local, one point after
another) and `pgolf.lab.slurm` (one Slurm job per point), and of `--status`."""
from __future__ import annotations

from typing import Any

from pgolf.errors import PgolfError
from pgolf.lab import slurm, sweep

SLURM_ONLY = ("nodes", "gpus_per_node", "partition", "time", "account", "sbatch", "dry_run", "wait", "cluster")


def cmd_sweep(args: Any) -> dict[str, Any]:
    """`pgolf sweep NOTEBOOK --seeds S... [-p NAME VALUE]... [--grid NAME=V1,V2]... [--nproc N]
    [--launcher local|slurm ...]`, or `pgolf sweep --status RUNS_ROOT`."""
    if args.status:
        if args.notebook:
            raise PgolfError("--status RUNS_ROOT takes no notebook")
        return slurm.status(args.status)
    if not args.notebook:
        raise PgolfError("give a notebook to sweep (or --status RUNS_ROOT)")
    sweep.check_runs_root(args.runs_root)  # a file there, or an unwritable parent: one line, before any work
    params: dict[str, Any] = {}
    for name, raw in args.params:
        if not sweep.is_name(name):
            raise PgolfError(f"-p {name!r}: not a parameter name or a dotted config key")
        params[name] = sweep.parse_value(raw)
    grid = sweep.parse_grid(args.grid)
    if args.launcher == "local":
        flags = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(args, k) not in (None, False, [])]
        if flags:
            raise PgolfError(f"{flags[0]}: only with --launcher slurm")
        return sweep.sweep(args.notebook, args.seeds, params, grid, nproc=args.nproc, runs_root=args.runs_root)
    given = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "partition": args.partition,
             "account": args.account, "time_min": slurm.parse_time(args.time) if args.time else None,
             "sbatch": slurm.parse_sbatch(args.sbatch), "cluster": args.cluster}
    opts = slurm.SlurmOptions(**{k: v for k, v in given.items() if v is not None})
    opts.check()
    # --nproc is per node here: one process per GPU of a node by default (one on a CPU-only node)
    nproc = args.nproc if args.nproc is not None else max(opts.gpus_per_node, 1)
    nb, params, grid = sweep.prepare(args.notebook, args.seeds, params, grid, nproc)
    items = sweep.plan(nb, args.seeds, params, grid, args.runs_root)
    return {**slurm.submit(nb, items, args.runs_root, opts, dry_run=args.dry_run, wait=args.wait),
            "nproc": params["nproc"]}
