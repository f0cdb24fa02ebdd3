"""`pgolf sweep`: execute a parameterised notebook once per seed x grid point with papermill.

Each point gets a run directory under `--runs-root` named from the notebook, the fixed parameters,
the grid point and the seed (`train-1a2b3c_lr-0.02_s1`), so a re-run finds it again: a point whose
run directory is finished (`RunDir.is_finished()`) is skipped. The notebook receives the `-p`
parameters (JSON literals where they parse), the grid values, `seed`, `nproc`, `run_dir` and
`runs_root` (the registry the run joins), and
must finish that run itself (the training notebook does it through `pgolf.train`). The executed
notebook is saved inside the run directory. A point that raises or ends without a finished run
gets `error.json` there and the sweep goes on; an earlier failed attempt is moved to
`<runs-root>/.failed/` before the point is retried, so its partial logs never mix with the new ones.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Sequence

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write_json
from pgolf.runs import RunDir

KERNEL = "python3"  # the kernel of the interpreter running the sweep (ipykernel's native spec)


def parse_value(raw: str) -> Any:
    """A `-p` / grid value: a JSON literal when it parses (1, 0.5, true, [..]), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not values:
            raise PgolfError(f"--grid {item!r}: expected NAME=V1,V2,...")
        if name in grid:
            raise PgolfError(f"--grid {name}: given twice")
        grid[name] = [parse_value(v) for v in values.split(",")]
    return grid


def _slug(value: Any) -> str:
    s = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-")[:40] or "x"


def point_name(notebook: str | Path, params: dict[str, Any], point: dict[str, Any], seed: int) -> str:
    """Deterministic run directory name: notebook stem, hash of the fixed parameters, grid point, seed."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    parts = [f"{Path(notebook).stem}-{hashlib.sha256(blob).hexdigest()[:6]}"]
    parts += [f"{_slug(k)}-{_slug(v)}" for k, v in point.items()]
    return "_".join(parts + [f"s{seed}"])


def plan(notebook: str | Path, seeds: Sequence[int], params: dict[str, Any], grid: dict[str, list[Any]],
         runs_root: str | Path) -> list[dict[str, Any]]:
    """Every seed x grid point with its run directory and notebook parameters (seeds vary fastest)."""
    reserved = {"seed", "run_dir", "runs_root"} & (set(params) | set(grid))
    if reserved:
        raise PgolfError(f"parameter {sorted(reserved)[0]!r} is set by the sweep itself")
    both = set(params) & set(grid)
    if both:
        raise PgolfError(f"parameter {sorted(both)[0]!r} given both with -p and --grid")
    if not seeds:
        raise PgolfError("--seeds: give at least one seed")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    out = []
    for point in points:
        for seed in seeds:
            run_dir = Path(runs_root).absolute() / point_name(notebook, params, point, seed)
            out.append({"seed": seed, "point": point, "run_dir": str(run_dir),
                        "parameters": {**params, **point, "seed": seed, "run_dir": str(run_dir),
                                       "runs_root": str(Path(runs_root).absolute())}})
    return out


def _retire(run_dir: Path, runs_root: Path) -> None:
    """Move an unfinished earlier attempt out of the way (kept for inspection, not deleted)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        dest = runs_root / ".failed" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(dest)


def execute(notebook: str | Path, item: dict[str, Any], runs_root: str | Path, cwd: str | None = None,
            kernel_name: str = KERNEL) -> dict[str, Any]:
    """Run one point; returns {status: finished|failed, ...}. Never raises for a notebook failure."""
    import papermill as pm

    run_dir = Path(item["run_dir"])
    _retire(run_dir, Path(runs_root))
    run_dir.mkdir(parents=True, exist_ok=True)
    output = run_dir / Path(notebook).name
    t0 = time.time()
    error = None
    try:
        pm.execute_notebook(str(notebook), str(output), parameters=item["parameters"], kernel_name=kernel_name,
                            progress_bar=False, cwd=cwd)
    except Exception as e:  # a failed point is recorded, never fatal to the sweep
        error = {"error": f"{type(e).__name__}: {_first_line(e)}", "traceback": traceback.format_exc()[-4000:]}
        ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
        if ename:
            error["error"] = f"{ename}: {_first_line(evalue)}"
    if error is None and not RunDir(run_dir).is_finished():
        error = {"error": "the notebook ran but its run did not finish (no result.json with status finished)"}
    entry = {"run_dir": str(run_dir), "seed": item["seed"], "point": item["point"], "notebook": str(output),
             "seconds": round(time.time() - t0, 1)}
    if error is None:
        RunDir(run_dir).file("error.json").unlink(missing_ok=True)
        return {**entry, "status": "finished"}
    atomic_write_json(run_dir / "error.json", {**entry, "status": "failed", "parameters": item["parameters"],
                                               "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **error})
    return {**entry, "status": "failed", "error": error["error"]}


def _first_line(x: Any) -> str:
    s = str(x).strip()
    return s.splitlines()[0][:300] if s else ""


def sweep(notebook: str | Path, seeds: Sequence[int], params: dict[str, Any] | None = None,
          grid: dict[str, list[Any]] | None = None, nproc: int | None = 1, runs_root: str | Path = "runs",
          cwd: str | None = None) -> dict[str, Any]:
    """Execute `notebook` for every seed x grid point; returns {runs, failed, skipped}."""
    from tqdm import tqdm

    nb = Path(notebook)
    if not nb.is_file():
        raise PgolfError(f"{nb}: notebook not found")
    params = dict(params or {})
    if nproc is not None:
        if "nproc" in params:
            raise PgolfError("give nproc with --nproc, not -p")
        params["nproc"] = int(nproc)
    items = plan(nb, seeds, params, grid or {}, runs_root)
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    runs, failed, skipped = [], [], []
    bar = tqdm(items, desc=f"sweep {nb.name}", unit="run", file=sys.stderr)
    for item in bar:
        name = Path(item["run_dir"]).name
        if RunDir(item["run_dir"]).is_finished():
            skipped.append(item["run_dir"])
            bar.write(f"skip {name} (finished)", file=sys.stderr)
            continue
        bar.set_postfix_str(name)
        res = execute(nb, item, runs_root, cwd=cwd or str(Path.cwd()))
        if res["status"] == "finished":
            runs.append(item["run_dir"])
        else:
            failed.append({"run_dir": item["run_dir"], "seed": item["seed"], "point": item["point"],
                           "error": res["error"]})
            bar.write(f"FAILED {name}: {res['error']}", file=sys.stderr)
    bar.close()
    return {"notebook": str(nb), "points": len(items), "runs": runs, "failed": failed, "skipped": skipped}


def cmd_sweep(args: Any) -> dict[str, Any]:
    """`pgolf sweep NOTEBOOK --seeds S... [-p NAME VALUE]... [--grid NAME=V1,V2]... [--nproc N]`."""
    params: dict[str, Any] = {}
    for name, raw in args.params:
        if not name.isidentifier():
            raise PgolfError(f"-p {name!r}: not a valid parameter name")
        params[name] = parse_value(raw)
    return sweep(args.notebook, args.seeds, params, parse_grid(args.grid), nproc=args.nproc,
                 runs_root=args.runs_root)
