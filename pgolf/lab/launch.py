"""Launch `pgolf.train` under torchrun from a notebook (or any process) and stream its log.

The caller never imports torch: training runs in child processes started by
`python -m torch.distributed.run --standalone`, so a notebook kernel never initialises CUDA or
NCCL and a crashed run cannot take the kernel with it. One process on a CPU machine, one per GPU
on a GPU machine (counted with `nvidia-smi`, not torch).

Inside a multi-node Slurm job (`pgolf.lab.slurm` sets PGOLF_NNODES and the rest of `multinode_env`)
the same call runs `torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT` instead, after
writing the launch to the job's launch folder, where the job's other nodes pick it up (`follow`) and
join the same rendezvous. The rendezvous orders the nodes itself, so global rank 0 (which prints the
final JSON and writes the run directory) may sit on another node: the result is then read from the
run directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from pgolf.errors import PgolfError, sigterm_raises
from pgolf.runs import RunDir


def gpu_count() -> int:
    """Visible NVIDIA GPUs, asked of `nvidia-smi` so this process never touches CUDA."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def default_nproc() -> int:
    return gpu_count() or 1


def train_args(preset: str | None = None, data: str | None = None, *, config: str | None = None,
               tokenizer: str | None = None, out: str | None = None, seed: int | None = None,
               max_seconds: float | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """The `pgolf.train` flags; None and "" mean "not given" (the preset's value)."""
    argv: list[str] = []
    for flag, value in (("--preset", preset), ("--config", config), ("--data", data),
                        ("--tokenizer", tokenizer), ("--out", out), ("--seed", seed),
                        ("--max-seconds", max_seconds)):
        if value is not None and value != "":
            argv += [flag, str(value)]
    for item in overrides:
        argv += ["--set", str(item)]
    return argv


MULTINODE = ("PGOLF_NNODES", "PGOLF_RDZV_ENDPOINT", "PGOLF_RDZV_ID", "PGOLF_LAUNCH_DIR")
DONE = "done"  # in the launch folder: the first node has no more launches
FOLLOW_POLL_S = 0.5


def multinode_env(nodes: int, endpoint: str, rdzv_id: str, launch_dir: str | Path) -> dict[str, str]:
    """The environment that makes `train` launch across `nodes` nodes (set by a Slurm job's tasks)."""
    return dict(zip(MULTINODE, (str(int(nodes)), endpoint, str(rdzv_id), str(launch_dir))))


def _multinode() -> dict[str, str] | None:
    env = {k: os.environ.get(k, "") for k in MULTINODE}
    return env if env["PGOLF_NNODES"] and int(env["PGOLF_NNODES"]) > 1 else None


def torchrun_cmd(train_argv: Sequence[str], nproc: int = 1, rdzv_id: str | None = None) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N -m pgolf.train ...` with this interpreter; inside a
    multi-node job, `--nnodes` with the job's c10d rendezvous (`rdzv_id` names this launch)."""
    if int(nproc) < 1:
        raise PgolfError(f"nproc must be >= 1 (got {nproc})")
    nodes = _multinode()
    where = ["--standalone"] if nodes is None else [
        "--nnodes", nodes["PGOLF_NNODES"], "--rdzv-backend", "c10d", "--rdzv-endpoint", nodes["PGOLF_RDZV_ENDPOINT"],
        "--rdzv-id", rdzv_id or nodes["PGOLF_RDZV_ID"]]
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(int(nproc)),
            "-m", "pgolf.train", *map(str, train_argv)]


def _publish(train_argv: Sequence[str], nproc: int) -> str:
    """Write the next launch of a multi-node job for the other nodes; returns its rendezvous id."""
    from pgolf.fileio import atomic_write_json

    nodes = _multinode()
    assert nodes is not None
    folder = Path(nodes["PGOLF_LAUNCH_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    k = len(list(folder.glob("*.json")))
    rdzv_id = f"{nodes['PGOLF_RDZV_ID']}-{k}"
    atomic_write_json(folder / f"{k:04d}.json", {"train_argv": list(map(str, train_argv)), "nproc": int(nproc),
                                                  "rdzv_id": rdzv_id})
    return rdzv_id


def end_launches(launch_dir: str | Path) -> None:
    """The first node is done: the following nodes stop waiting."""
    Path(launch_dir).mkdir(parents=True, exist_ok=True)
    (Path(launch_dir) / DONE).touch()


def follow(launch_dir: str | Path, file: Any = None) -> int:
    """On a job's other nodes: run each launch the first node publishes, in order, until it is done.
    Returns the number of launches joined. A failed launch is the first node's to report."""
    folder, k = Path(launch_dir), 0
    while True:
        nxt = folder / f"{k:04d}.json"
        if nxt.exists():
            spec = json.loads(nxt.read_text())
            try:
                stream(torchrun_cmd(spec["train_argv"], spec["nproc"], spec["rdzv_id"]), file=file)
            except PgolfError as e:
                print(f"pgolf: launch {k} failed on this node: {str(e).splitlines()[0]}", file=file or sys.stdout)
            k += 1
        elif (folder / DONE).exists():
            return k
        else:
            time.sleep(FOLLOW_POLL_S)


def _last_metrics(path: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The newest complete line of a growing metrics.jsonl (reads only what was appended)."""
    if not path.exists():
        return None
    with open(path) as f:
        f.seek(state.get("offset", 0))
        chunk = state.get("rest", "") + f.read()
        state["offset"] = f.tell()
    *lines, state["rest"] = chunk.split("\n")
    for line in reversed(lines):
        if line.strip():
            try:
                state["last"] = json.loads(line)
            except json.JSONDecodeError:
                continue
            break
    return state.get("last")


def stream(cmd: Sequence[str], *, echo: Callable[[str], None] | None = None, run_dir: str | Path | None = None,
           total_seconds: float | None = None, env: dict[str, str] | None = None, tail: int = 60,
           file: Any = None, watch: Callable[[str], None] | None = None) -> list[str]:
    """Run `cmd`, echoing its merged stdout/stderr line by line to `file` (stdout by default); with
    `run_dir`, a text progress bar follows the run's metrics.jsonl (`time_s` of `total_seconds`).
    `watch` is called with every line after it is echoed (`pgolf.lab.live.Follow`: a live figure or a
    progress line); it replaces the text bar. Returns all lines; raises PgolfError with the log tail on a
    non-zero exit."""
    from tqdm import tqdm  # the text bar: the same in a terminal, a notebook and a papermill output

    file = file or sys.stdout
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    lines: list[str] = []
    last: deque[str] = deque(maxlen=tail)
    fmt = ("{desc}: {percentage:3.0f}%|{bar:20}| {n:.0f}/{total:.0f} s of training [{elapsed}{postfix}]"
           if total_seconds else "{desc}: {n:.0f} s of training [{elapsed}{postfix}]")
    bar = tqdm(total=round(total_seconds) if total_seconds else None, desc="train", file=file, leave=True,
               bar_format=fmt, dynamic_ncols=False) if run_dir and watch is None else None
    if echo is None:
        echo = (lambda s: bar.write(s, file=file)) if bar is not None else (lambda s: print(s, file=file, flush=True))
    mstate: dict[str, Any] = {}
    # Own process group, so an interrupt stops torchrun and all its workers. SIGTERM of this process
    # (a sweep stopping a notebook's kernel) raises too, so the children are stopped, never orphaned.
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=full_env, start_new_session=True)
    try:
        with sigterm_raises():
            try:
                _follow(proc, lines, last, echo, bar, run_dir, mstate, watch)
                rc = proc.wait()
            except BaseException:
                _kill(proc)  # inside: a second SIGTERM is ignored until the children are gone
                raise
    finally:
        if bar is not None:
            bar.close()
    if rc != 0:  # the child's own error first: a sweep or a notebook shows only the first line
        shown = "\n".join(last)
        raise PgolfError(f"{error_line(last) or 'no output'} [{' '.join(map(str, cmd[:8]))} ... exited with "
                         f"status {rc}]\nlast lines:\n{shown}")
    return lines


_EXCEPTION = re.compile(r"^(?:\[\w+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Terminated)\b.*)$")


def error_line(lines: Sequence[str]) -> str:
    """The line of a child's output that says why it failed: its last `pgolf: error:` line (what the CLI
    prints for bad input), else the last exception line of a traceback, else the last non-empty line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if "pgolf: error:" in line:
            return line[line.index("pgolf: error:"):]
    for line in reversed(lines):
        m = _EXCEPTION.match(line)
        if m:
            return m.group(1)
    return lines[-1] if lines else ""


def _follow(proc: subprocess.Popen, lines: list[str], last: deque[str], echo: Callable[[str], None], bar: Any,
            run_dir: str | Path | None, mstate: dict[str, Any], watch: Callable[[str], None] | None) -> None:
    """Echo the child's lines as they come; move the progress bar along its metrics.jsonl."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        last.append(line)
        echo(line)
        if watch is not None:
            watch(line)
        if bar is not None and run_dir is not None:  # (the bar exists only with a run_dir)
            m = _last_metrics(Path(run_dir) / "metrics.jsonl", mstate)
            if m and m.get("time_s") is not None:
                bar.n = min(round(float(m["time_s"])), bar.total or float("inf"))
                bar.set_postfix({k: m[k] for k in ("step", "train_loss", "val_bpb") if m.get(k) is not None},
                                refresh=False)
                bar.refresh()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            return  # already gone
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def final_json(lines: Sequence[str]) -> dict[str, Any]:
    """The last line that is a JSON object (the command's result, by the CLI contract)."""
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("{") and s.endswith("}"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise PgolfError("the training command printed no final JSON line")


def train(preset: str | None = None, data: str | None = None, *, nproc: int = 1, config: str | None = None,
          tokenizer: str | None = None, out: str | None = None, seed: int | None = None,
          max_seconds: float | None = None, overrides: Sequence[str] = (),
          echo: Callable[[str], None] | None = None, budget_seconds: float | None = None,
          watch: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train under torchrun, streaming the log; returns the final JSON of rank 0.

    `budget_seconds` only sizes the progress bar (default: `max_seconds`, else the config's budget);
    `watch` sees every log line instead of the bar (see `stream`)."""
    argv = train_args(preset, data, config=config, tokenizer=tokenizer, out=out, seed=seed,
                      max_seconds=max_seconds, overrides=overrides)
    rdzv_id = _publish(argv, nproc) if _multinode() else None
    cmd = torchrun_cmd(argv, nproc, rdzv_id)
    if budget_seconds is None:
        budget_seconds = max_seconds or _config_budget(config)
    lines = stream(cmd, echo=echo, run_dir=out, total_seconds=budget_seconds or None, watch=watch)
    try:
        return final_json(lines)
    except PgolfError:
        if rdzv_id and out and RunDir(out).is_finished():  # global rank 0 ran on another node
            return RunDir(out).result()
        raise


def _config_budget(config: str | None) -> float | None:
    try:
        return float(json.loads(Path(config).read_text())["train"]["max_seconds"]) if config else None
    except (OSError, KeyError, TypeError, ValueError):
        return None


def kernel_is_clean() -> bool:
    """True while this process has not initialised CUDA nor a torch.distributed process group."""
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    cuda_up = bool(getattr(torch, "cuda", None) and torch.cuda.is_initialized())
    dist = getattr(torch, "distributed", None)
    dist_up = bool(dist and dist.is_available() and dist.is_initialized())
    return not (cuda_up or dist_up)
