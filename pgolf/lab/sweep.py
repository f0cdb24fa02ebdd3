"""`pgolf sweep`: execute a parameterised notebook once per seed x grid point with papermill.

Each point gets a run directory under `--runs-root` named from the notebook, the fixed parameters,
the grid point and the seed (`train-1a2b3c_lr-0.02_s1`), so a re-run finds it again: a point whose
run directory is finished (`RunDir.is_finished()`) is skipped. The notebook receives the `-p`
parameters (JSON literals where they parse), the grid values, `seed`, `nproc` (default: one
process per visible GPU, one without a GPU), `run_dir` and `runs_root` (the registry the run joins),
and must finish that run itself (the training notebook does it through `pgolf.train`). A `-p` or
grid name with a dot is a config key (`--grid model.attn_gate_width=12,24`): its values reach the
notebook as `--set` strings appended to its `overrides` parameter.

Everything is checked before the first point runs: the notebook is read (without a kernel) and must
declare `seed`, `run_dir` and every `-p` / `--grid` name; config keys must exist and their values
must lie in their domains. Each point runs papermill in a child process (its output in
`papermill.log` beside the executed notebook, both in the run directory), so SIGINT or SIGTERM of
the sweep stops the point's kernel, records the point as interrupted and ends the sweep (exit 130 /
143). A point that raises or ends without a finished run gets `error.json` (its first line is the
notebook's own error: the exception and, for a training child, its `pgolf: error:` line) and the
sweep goes on; the command then exits 1 after printing its JSON. An earlier failed attempt is moved
to `<runs-root>/.failed/` before the point is retried, so its partial logs never mix with the new ones.
`pgolf.lab.slurm` runs the same points as Slurm jobs (`--launcher slurm`), each through `execute`.

Before the first point, both launchers write every point's spec (`<runs-root>/.jobs/<point>/spec.json`:
notebook, parameters, run directory, launcher; a local sweep adds its process), so
`pgolf sweep --status RUNS_ROOT` (`pgolf.lab.slurm.status`) lists the points of local sweeps too.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write_json, check_output
from pgolf.lab.launch import default_nproc, error_line
from pgolf.runs import RunDir, move_aside

JOBS = ".jobs"  # beside the run directories: one folder per point, with its spec.json
KERNEL = "python3"  # the kernel of the interpreter running the sweep (ipykernel's native spec)
OVERRIDES = "overrides"  # the notebook parameter that receives grid config keys as `--set` strings
PRESET, BUDGET = "preset", "max_seconds"  # train.ipynb's preset name and wall-clock budget (0: the preset's)
DATA = "data"  # train.ipynb's data folder, relative to the project root
REQUIRED = ("seed", "run_dir")  # set by the sweep for every point: the notebook must use them
STOP_SECONDS = 30  # for papermill to exit once its kernel was told to stop (a trainer stops within ~10 s)


def parse_value(raw: str) -> Any:
    """A `-p` / grid value: a JSON literal when it parses (1, 0.5, true, [..]), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def is_name(name: str) -> bool:
    """A notebook parameter (`lr`) or a dotted config key (`model.attn_gate_width`)."""
    return all(part.isidentifier() for part in name.split("."))


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not is_name(name) or not values:
            raise PgolfError(f"--grid {item!r}: expected NAME=V1,V2,... (NAME a parameter or a config key)")
        if name in grid:
            raise PgolfError(f"--grid {name}: given twice")
        grid[name] = [parse_value(v) for v in values.split(",")]
    return grid


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The parameters a notebook's `parameters` cell declares, read without starting a kernel."""
    import warnings

    import papermill as pm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # papermill warns about a suffix; the error below says more
            return pm.inspect_notebook(str(notebook))
    except Exception as e:
        raise PgolfError(f"{notebook}: not a readable notebook ({type(e).__name__}: {_first_line(e)})") from None


def check(notebook: str | Path, params: dict[str, Any], grid: dict[str, list[Any]]) -> None:
    """Fail before any point runs: names the notebook does not declare, config keys that do not exist,
    values outside their domains."""
    declared = notebook_parameters(notebook)
    listed = ", ".join(declared) or "none: tag a cell 'parameters'"
    for name in [*REQUIRED, *(k for k in [*params, *grid] if "." not in k)]:
        if name not in declared:
            raise PgolfError(f"{notebook}: no parameter {name!r} (its parameters: {listed})")
    if OVERRIDES in params and not (isinstance(params[OVERRIDES], list)
                                    and all(isinstance(o, str) for o in params[OVERRIDES])):
        raise PgolfError(f"-p {OVERRIDES}: expected a JSON list of key=value strings")
    keys = {**{k: [v] for k, v in params.items() if "." in k}, **{k: v for k, v in grid.items() if "." in k}}
    for key, values in keys.items():
        flag = "--grid" if key in grid else "-p"
        if OVERRIDES not in declared:
            raise PgolfError(f"{flag} {key}: {notebook} has no {OVERRIDES!r} parameter to receive config keys")
        for v in values:
            try:
                Config().with_overrides([_override(key, v)])  # the key exists; the value has its type and domain
            except PgolfError as e:
                raise PgolfError(f"{flag} {key}={json.dumps(v)}: {e}") from None
    given = PRESET in params or PRESET in grid
    if PRESET in declared and (given or params.get(OVERRIDES)):
        from pgolf.presets import get_preset

        for name in grid.get(PRESET, [params.get(PRESET, _default(declared[PRESET]))]):
            try:  # the preset exists and takes the fixed --set strings
                get_preset(name, params.get(OVERRIDES, []) if OVERRIDES in declared else [])
            except PgolfError as e:
                where = f"{'--grid' if PRESET in grid else '-p'} {PRESET}={json.dumps(name)}" if given else \
                    f"-p {OVERRIDES} (on {PRESET} {json.dumps(name)})"
                raise PgolfError(f"{where}: {e}") from None
    for v in grid.get(BUDGET, [params[BUDGET]] if BUDGET in params else []) if BUDGET in declared else []:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            flag = "--grid" if BUDGET in grid else "-p"
            raise PgolfError(f"{flag} {BUDGET}={json.dumps(v)}: expected a number >= 0 (0: the preset's budget)")


def check_data(notebook: str | Path, params: dict[str, Any], grid: dict[str, list[Any]], cwd: str | None) -> None:
    """A sweep run here: every data folder its points will read (given, or the notebook's default) holds
    validation shards, found as the notebook finds it (relative paths from the project root)."""
    from pgolf.lab.trials import data_ready
    from pgolf.lab.workbench import project_root

    declared = notebook_parameters(notebook)
    if DATA not in declared:
        return
    root = project_root(cwd)
    flag = "--grid" if DATA in grid else "-p" if DATA in params else f"{notebook}'s default"
    for v in grid.get(DATA, [params.get(DATA, _default(declared[DATA]))]):
        problem = data_ready(root / v) if isinstance(v, str) and v else ""
        if problem:
            raise PgolfError(f"{flag} {DATA}={json.dumps(v)}: {problem}")


def _default(param: dict[str, Any]) -> Any:
    """A declared parameter's default value (papermill gives its source text)."""
    try:
        return ast.literal_eval(param["default"])
    except (ValueError, SyntaxError):
        return param["default"]


def point_name(notebook: str | Path, params: dict[str, Any], point: dict[str, Any], seed: int) -> str:
    """Deterministic run directory name: notebook stem, hash of the fixed parameters, grid point, seed."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    parts = [f"{Path(notebook).stem}-{hashlib.sha256(blob).hexdigest()[:6]}"]
    parts += [f"{_slug(k, exact=False)}-{_slug(v)}" for k, v in point.items()]
    return "_".join(parts + [f"s{seed}"])


def _slug(value: Any, exact: bool = True) -> str:
    """A name part for `value`: its text where that is short and plain, else the text shortened and made
    plain, with a hash of the whole text so that two values never share a part (`exact`; a parameter or
    config key is a name already, whose `_` -> `-` loses nothing)."""
    s = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    plain = re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-")[:40] or "x"
    return plain if plain == s or not exact else f"{plain[:33]}-{hashlib.sha256(s.encode()).hexdigest()[:6]}"


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
    twice = next((x for i, x in enumerate(seeds) if x in seeds[:i]), None)
    if twice is not None:
        raise PgolfError(f"--seeds: seed {twice} given twice")
    for key, values in grid.items():
        texts = [json.dumps(v, sort_keys=True) for v in values]
        same = next((v for i, v in enumerate(values) if texts[i] in texts[:i]), None)
        if same is not None:
            raise PgolfError(f"--grid {key}: value {json.dumps(same)} given twice")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else [{}]
    root = Path(runs_root).absolute()
    out = []
    for point in points:
        given = {**params, **point}
        parameters = {k: v for k, v in given.items() if "." not in k}
        sets = [_override(k, v) for k, v in given.items() if "." in k]
        if sets:  # config keys: appended to the notebook's --set strings
            parameters[OVERRIDES] = [*params.get(OVERRIDES, []), *sets]
        for seed in seeds:
            run_dir = root / point_name(notebook, params, point, seed)
            out.append({"seed": seed, "point": point, "run_dir": str(run_dir),
                        "parameters": {**parameters, "seed": seed, "run_dir": str(run_dir), "runs_root": str(root)}})
    dirs = [item["run_dir"] for item in out]
    if len(set(dirs)) < len(dirs):  # never two points in one folder (the second would be "skipped")
        clash = next(d for i, d in enumerate(dirs) if d in dirs[:i])
        raise PgolfError(f"grid points {[i['point'] for i in out if i['run_dir'] == clash]} would share {clash}")
    return out


def check_runs_root(runs_root: str | Path) -> Path:
    """`--runs-root` must be (or become) a writable folder: one error line before any point runs."""
    return check_output(runs_root, "--runs-root", kind="dir")


def write_spec(runs_root: str | Path, notebook: str | Path, item: dict[str, Any], launcher: str,
               cwd: str | None = None, **fields: Any) -> Path:
    """`<runs_root>/.jobs/<point>/spec.json` (atomic): what the point runs and which launcher runs it
    (a Slurm job reads it; `--status` lists every point that has one). Returns the point's folder."""
    root = Path(runs_root).absolute()
    job_dir = root / JOBS / Path(item["run_dir"]).name
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job_dir / "spec.json", {"notebook": str(Path(notebook).absolute()), "item": item,
                                              "runs_root": str(root), "cwd": cwd or os.getcwd(),
                                              "launcher": launcher, **fields})
    return job_dir


def _this_sweep() -> dict[str, Any]:
    """What identifies this local sweep's process, so `--status` can tell whether it still runs."""
    import socket

    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(), "written_at": time.time()}


def retire(run_dir: Path, runs_root: Path) -> None:
    """Move an unfinished earlier attempt out of the way (kept for inspection, not deleted)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        move_aside(run_dir, runs_root)


def execute(notebook: str | Path, item: dict[str, Any], runs_root: str | Path, cwd: str | None = None,
            kernel_name: str = KERNEL) -> dict[str, Any]:
    """Run one point in its run directory (an earlier attempt already `retire`d); returns {status:
    finished|failed, ...}. Never raises for a notebook failure; a SIGINT / SIGTERM of the sweep stops
    the point, records it as interrupted and propagates."""
    run_dir = Path(item["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    output = run_dir / Path(notebook).name
    log_path = run_dir / "papermill.log"
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(output), "-y", json.dumps(item["parameters"]),
           "-k", kernel_name, "--cwd", cwd or str(Path.cwd()), "--no-progress-bar", "--log-level", "WARNING"]
    entry = {"run_dir": str(run_dir), "seed": item["seed"], "point": item["point"], "notebook": str(output)}
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except BaseException as stop:  # KeyboardInterrupt / Terminated: stop the kernel first
            _stop(proc)
            _record_error(run_dir, {**entry, "seconds": round(time.time() - t0, 1)}, item, "interrupted",
                          f"{type(stop).__name__}: the sweep was stopped", log_path)
            raise
    entry["seconds"] = round(time.time() - t0, 1)
    error = None
    if rc != 0:
        error = _notebook_error(output) or error_line(log_path.read_text().splitlines()) or \
            f"papermill exited with status {rc}"
    elif not RunDir(run_dir).is_finished():
        said = _notebook_last_line(output)
        error = "the notebook ran but its run did not finish (no result.json with status finished)" + \
            (f"; its last output: {said}" if said else "")
    if error is None:
        RunDir(run_dir).file("error.json").unlink(missing_ok=True)
        return {**entry, "status": "finished"}
    _record_error(run_dir, entry, item, "failed", error, log_path)
    return {**entry, "status": "failed", "error": error}


def _stop(proc: subprocess.Popen) -> None:
    """Stop a running point. Its kernels (papermill's children, each in its own process group) get
    SIGTERM first, so a training child the kernel launched is stopped by `launch.stream` rather than
    orphaned; papermill then records the error and exits. SIGTERM, then SIGKILL, whatever lingers."""
    import psutil

    try:
        kernels = psutil.Process(proc.pid).children()
    except psutil.Error:
        kernels = []
    for k in kernels:
        with contextlib.suppress(OSError):
            os.killpg(k.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(kernels, timeout=5)
    for k in alive:
        with contextlib.suppress(psutil.Error):
            k.kill()


def _record_error(run_dir: Path, entry: dict[str, Any], item: dict[str, Any], status: str, error: str,
                  log_path: Path) -> None:
    tail = log_path.read_text().splitlines()[-40:] if log_path.exists() else []
    atomic_write_json(run_dir / "error.json", {**entry, "status": status, "parameters": item["parameters"],
                                               "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": error,
                                               "log_tail": tail})


def _notebook_error(output: Path) -> str | None:
    """`Ename: first line of its message` of the executed notebook's first error output, if any."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:  # papermill failed before writing it, or wrote half of it
        return None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {_first_line(out.get('evalue', ''))}"
    return None


def _notebook_last_line(output: Path) -> str | None:
    """The last line the executed notebook printed (a stream output), if any."""
    import nbformat

    try:
        nb = nbformat.read(output, as_version=4)
    except Exception:
        return None
    lines = [line for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "stream"
             for line in str(out.get("text", "")).splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def _first_line(x: Any) -> str:
    s = str(x).strip()
    return s.splitlines()[0][:500] if s else ""


def prepare(notebook: str | Path, seeds: Sequence[int], params: dict[str, Any] | None,
            grid: dict[str, list[Any]] | None, nproc: int) -> tuple[Path, dict[str, Any], dict[str, list[Any]]]:
    """Check everything a sweep (local or Slurm) needs before its first point; returns the notebook
    path and the parameters with `nproc` added."""
    nb = Path(notebook)
    if not nb.is_file():
        raise PgolfError(f"{nb}: notebook not found")
    params, grid = dict(params or {}), dict(grid or {})
    if "nproc" in params or "nproc" in grid:
        raise PgolfError("give nproc with --nproc, not -p or --grid")
    params["nproc"] = int(nproc)
    if params["nproc"] < 1:
        raise PgolfError(f"--nproc {params['nproc']}: expected >= 1")
    check(nb, {k: v for k, v in params.items() if k != "nproc"}, grid)
    return nb, params, grid


def sweep(notebook: str | Path, seeds: Sequence[int], params: dict[str, Any] | None = None,
          grid: dict[str, list[Any]] | None = None, nproc: int | None = None, runs_root: str | Path = "runs",
          cwd: str | None = None) -> dict[str, Any]:
    """Execute `notebook` for every seed x grid point; returns {runs, failed, skipped, ...}."""
    from tqdm import tqdm

    check_runs_root(runs_root)
    nb, params, grid = prepare(notebook, seeds, params, grid, default_nproc() if nproc is None else nproc)
    check_data(nb, params, grid, cwd)
    items = plan(nb, seeds, params, grid, runs_root)
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    me = _this_sweep()
    for item in items:  # a point with Slurm jobs keeps their spec: a queued job reads it when it starts
        if not (Path(runs_root) / JOBS / Path(item["run_dir"]).name / "jobs.json").exists():
            write_spec(runs_root, nb, item, "local", cwd=cwd, **me)
    runs, failed, skipped = [], [], []
    bar = tqdm(items, desc=f"sweep {nb.name}", unit="run", file=sys.stderr)
    for item in bar:
        name = Path(item["run_dir"]).name
        if RunDir(item["run_dir"]).is_finished():
            skipped.append(item["run_dir"])
            bar.write(f"skip {name} (finished)", file=sys.stderr)
            continue
        bar.set_postfix_str(name)
        retire(Path(item["run_dir"]), Path(runs_root))
        res = execute(nb, item, runs_root, cwd=cwd)
        if res["status"] == "finished":
            runs.append(item["run_dir"])
        else:
            failed.append({"run_dir": item["run_dir"], "seed": item["seed"], "point": item["point"],
                           "error": res["error"]})
            bar.write(f"FAILED {name}: {res['error']}", file=sys.stderr)
    bar.close()
    return {"notebook": str(nb), "points": len(items), "nproc": params["nproc"], "runs": runs, "failed": failed,
            "skipped": skipped}
