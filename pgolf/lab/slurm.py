"""`pgolf sweep --launcher slurm`: every seed x grid point as one Slurm job, submitted with submitit.

A job executes the point's parameterised notebook with papermill, exactly as the local sweep does
(`sweep.execute`), on the job's first node. With `--nodes N > 1` each node runs one task: the first
runs the notebook, whose `pgolf.lab.launch.train` starts `torchrun --nnodes N --rdzv-backend c10d`
with the rendezvous on the job's first host (from SLURM_JOB_NODELIST, through submitit's
`JobEnvironment`) and publishes each launch in the job folder; the other nodes follow those launches
with the same torchrun command (`launch.follow`). Runs root, data and the project must therefore lie
on a filesystem every node sees, as usual on a cluster.

Files, under the runs root:
  .jobs/<point>/spec.json     what the job runs (notebook, parameters, nodes, cwd); the job reads it
                              (a local sweep writes one per point too: `--status` lists both)
  .jobs/<point>/job.sbatch    with --dry-run: the sbatch script (`sbatch` it by hand), nothing submitted
  .jobs/<point>/<job id>_*    submitit's logs, submission script and result of each attempt
  .jobs/<point>/jobs.json     every submitted job id of the point, newest last
  <point>/job.json            written by the job: its id, hosts and state (RUNNING, FINISHED, FAILED)
  <point>/<notebook>.ipynb    the executed notebook (and papermill.log, error.json as for a local sweep)

Running the same `pgolf sweep --launcher slurm ...` again submits only the points that are neither
finished nor still queued or running; a failed attempt is moved to `.failed/` when its new job starts.
`pgolf sweep --status RUNS_ROOT` lists every point with its job and state. `--cluster local` runs the
same jobs with submitit's local executor (child processes of this machine, a node per task) and waits.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write_json
from pgolf.lab import launch, sweep
from pgolf.runs import RunDir, moved_aside

JOBS = sweep.JOBS  # beside the run directories: one folder per point
# sacct states of a job that is queued or still running (or about to run again)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
RDZV_PORT = 29400  # + a number from the job id, so two multi-node jobs sharing a host do not collide


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time_min: int = 60  # the job's wall-clock limit (sbatch --time)
    account: str | None = None
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra `#SBATCH --key=value` lines
    cluster: str = "slurm"  # submitit's executor: slurm, or local (child processes, for tests)

    def check(self) -> None:
        if self.nodes < 1:
            raise PgolfError(f"--nodes {self.nodes}: expected >= 1")
        if self.gpus_per_node < 0:
            raise PgolfError(f"--gpus-per-node {self.gpus_per_node}: expected >= 0")
        if self.cluster not in ("slurm", "local"):
            raise PgolfError(f"--cluster {self.cluster!r}: expected slurm or local")


def parse_time(raw: str) -> int:
    """sbatch's --time formats as whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", raw.strip())
    if not m:
        raise PgolfError(f"--time {raw!r}: expected minutes, H:MM:SS or D-HH:MM:SS")
    days, parts = m.group(1), [int(x) for x in m.groups()[1:] if x is not None]
    if days is not None:  # D-H[:M[:S]]
        h, mi, sec = (parts + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + mi) * 60 + sec
    elif len(parts) == 3:  # H:M:S
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    else:  # M or M:S
        seconds = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
    if seconds < 1:
        raise PgolfError(f"--time {raw!r}: expected a positive duration")
    return -(-seconds // 60)


def parse_sbatch(items: Sequence[str]) -> dict[str, Any]:
    """`--sbatch qos=high --sbatch exclusive` -> {"qos": "high", "exclusive": True}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key) or (sep and not value):
            raise PgolfError(f"--sbatch {item!r}: expected KEY=VALUE or KEY (an sbatch option without its --)")
        out[key] = value if sep else True
    return out


# ---- submission

def _job_dir(runs_root: Path, run_dir: str) -> Path:
    return runs_root / JOBS / Path(run_dir).name


def _slurm_parameters(opts: SlurmOptions, name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters: one task per node (its torchrun spawns the GPU workers)."""
    given = {"gpus_per_node": opts.gpus_per_node or None, "partition": opts.partition, "account": opts.account,
             "additional_parameters": dict(opts.sbatch) or None}
    return {"job_name": name, "nodes": opts.nodes, "ntasks_per_node": 1, "time": opts.time_min,
            **{k: v for k, v in given.items() if v is not None}}


def _executor(folder: Path, opts: SlurmOptions, name: str):
    import shutil

    import submitit

    if opts.cluster == "local":  # one node only: each task plays one node on this machine
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=opts.time_min, tasks_per_node=opts.nodes)
        return local
    if not shutil.which("srun"):
        raise PgolfError("no Slurm here (srun not found): submit from a login node of the cluster, or use "
                         "--dry-run (sbatch scripts) or --cluster local")
    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(**_slurm_parameters(opts, name))
    return ex


def sbatch_script(job_dir: Path, opts: SlurmOptions) -> str:
    """The sbatch script of one point: submitit's header for these options, then one task per node
    running `python -m pgolf.lab.slurm JOB_DIR`, which calls `run_point` as a submitted job does."""
    from submitit.slurm.slurm import _make_sbatch_string  # the header submitit itself submits

    command = shlex.join([sys.executable, "-u", "-m", "pgolf.lab.slurm", str(job_dir)])
    return _make_sbatch_string(command=command, folder=job_dir, **_slurm_parameters(opts, job_dir.name))


def submit(notebook: Path, items: list[dict[str, Any]], runs_root: str | Path, opts: SlurmOptions,
           dry_run: bool = False, wait: bool = False, cwd: str | None = None) -> dict[str, Any]:
    """Submit every point that is neither finished nor queued / running; returns the sweep's JSON."""
    opts.check()
    root = Path(runs_root).absolute()
    submitted, skipped, active, scripts, jobs = [], [], [], [], []
    for item in items:
        run_dir = item["run_dir"]
        state = point_status(root, run_dir)
        if state["status"] == "finished":
            skipped.append(run_dir)
            continue
        if state["status"] == "active":
            active.append({"run_dir": run_dir, "job_id": state["job_id"], "state": state["state"]})
            continue
        job_dir = sweep.write_spec(root, notebook, item, "slurm", cwd=cwd, nodes=opts.nodes, cluster=opts.cluster)
        if dry_run:
            script = job_dir / "job.sbatch"
            script.write_text(sbatch_script(job_dir, opts))
            scripts.append(str(script))
            continue
        job = _executor(job_dir, opts, job_dir.name).submit(run_point, str(job_dir))
        _record_submission(job_dir, job.job_id, opts)
        submitted.append({"run_dir": run_dir, "job_id": job.job_id})
        jobs.append(job)
        print(f"submitted {Path(run_dir).name}: job {job.job_id}", file=sys.stderr)
    # runs / failed: the submitted points that ended finished / otherwise, known only when the sweep
    # waited for its jobs (`waited`: --wait, --cluster local); else both empty (`--status` follows them)
    out: dict[str, Any] = {"launcher": "slurm", "cluster": opts.cluster, "notebook": str(notebook),
                           "points": len(items), "nodes": opts.nodes, "submitted": submitted,
                           "skipped": skipped, "active": active, "runs": [], "failed": [],
                           "waited": not dry_run and (wait or opts.cluster == "local")}
    if dry_run:
        return {**out, "dry_run": True, "scripts": scripts}
    if wait or opts.cluster == "local":  # local jobs are this process's children: see them through
        try:
            for job in jobs:
                job.wait()
        except BaseException:  # Ctrl-C / SIGTERM: local jobs stop with us; Slurm jobs stay queued
            if opts.cluster == "local":
                for job in jobs:
                    job.cancel(check=False)
            raise
        statuses = [point_status(root, s["run_dir"]) for s in submitted]
        out["runs"] = [s["run_dir"] for s in statuses if s["status"] == "finished"]
        out["failed"] = [{k: s.get(k) for k in ("run_dir", "job_id", "state", "error")}
                         for s in statuses if s["status"] != "finished"]
    return out


def _record_submission(job_dir: Path, job_id: str, opts: SlurmOptions) -> None:
    path = job_dir / "jobs.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history.append({"job_id": str(job_id), "cluster": opts.cluster, "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(path, history)


# ---- state

def _scheduler_state(cluster: str, job_id: str, job_dir: Path) -> str:
    """What the scheduler says of a job (sacct through submitit); a local job: alive or not."""
    if cluster == "local":
        import psutil

        return "RUNNING" if psutil.pid_exists(int(job_id)) else "ENDED"
    import submitit

    return str(submitit.SlurmJob(folder=job_dir, job_id=job_id).state)


def point_status(runs_root: Path, run_dir: str | Path) -> dict[str, Any]:
    """{run_dir, launcher, status: finished | active | failed | new, job_id, state, attempts, notebook,
    error}.

    The job's own record (`job.json`) says RUNNING / FINISHED / FAILED; the scheduler says the rest
    (PENDING, or TIMEOUT / CANCELLED for a job that could not record its end) and wins while it calls
    the job active: a preempted Slurm job that recorded FAILED is requeued under the same id. A point
    of a local sweep (no job) is told from its run directory and whether that sweep still runs."""
    run_dir = Path(run_dir)
    job_dir = _job_dir(runs_root, str(run_dir))
    history = json.loads((job_dir / "jobs.json").read_text()) if (job_dir / "jobs.json").exists() else []
    record = _read(run_dir / "job.json")
    if not history and record.get("job_id"):  # a --dry-run script submitted by hand: the job's own record
        history = [{"job_id": record["job_id"], "cluster": "slurm"}]
    last = history[-1] if history else None
    spec = _read(job_dir / "spec.json")
    local = last is None and spec.get("launcher") == "local"
    attempts = len(history)
    if local:  # a local sweep's attempts: the retired ones under .failed/, and the one in the folder
        attempts = len(moved_aside(run_dir, runs_root)) + int(run_dir.is_dir() and any(run_dir.iterdir()))
    out: dict[str, Any] = {"run_dir": str(run_dir), "launcher": "local" if local else "slurm",
                           "job_id": last and last["job_id"], "state": None, "attempts": attempts}
    error = _read(run_dir / "error.json")
    if error:
        out["error"] = error.get("error")
    if record.get("notebook") or error.get("notebook"):
        out["notebook"] = record.get("notebook") or error["notebook"]
    if RunDir(run_dir).is_finished():
        if local and (run_dir / Path(spec.get("notebook", "")).name).is_file():
            out["notebook"] = str(run_dir / Path(spec["notebook"]).name)
        return {**out, "status": "finished", "state": record.get("state", "FINISHED")}
    if local:
        return {**out, **_local_state(run_dir, spec, error)}
    if last is None:
        return {**out, "status": "new"}
    cluster = last.get("cluster", "slurm")
    recorded = record.get("state") if record.get("job_id") == last["job_id"] else None
    if cluster == "local" and recorded in ("FINISHED", "FAILED"):
        return {**out, "status": "failed", "state": recorded}  # a local job id is a pid: not asked again
    state = _scheduler_state(cluster, last["job_id"], job_dir)
    out["state"] = recorded if recorded and state not in ACTIVE else state
    if state in ACTIVE or (state == "UNKNOWN" and recorded in (None, "RUNNING")):
        return {**out, "status": "active"}  # queued, running, requeued, or unknown to sacct (yet)
    out.setdefault("error", f"job {last['job_id']} ended ({state}) without a finished run")
    return {**out, "status": "failed"}


def _local_state(run_dir: Path, spec: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """An unfinished point of a local sweep. While its sweep runs: failed if it failed in that sweep,
    else RUNNING (its papermill has started) or PENDING (queued behind other points), both `active`.
    Once the sweep is gone: failed (error.json, or a run directory it left unfinished) or new."""
    started = spec.get("written_at", 0)
    log = run_dir / "papermill.log"
    if _sweep_alive(spec):
        if error and (run_dir / "error.json").stat().st_mtime >= started:
            return {"status": "failed", "state": str(error.get("status", "failed")).upper()}
        running = log.exists() and log.stat().st_mtime >= started
        return {"status": "active", "state": "RUNNING" if running else "PENDING"}
    if error:
        return {"status": "failed", "state": str(error.get("status", "failed")).upper()}
    if run_dir.exists() and any(run_dir.iterdir()):
        return {"status": "failed", "state": "ENDED",
                "error": "the sweep ended before this point finished (no result.json with status finished)"}
    return {"status": "new"}


def _sweep_alive(spec: dict[str, Any]) -> bool:
    """Whether the local sweep that wrote `spec` still runs: its process, started when it says (a pid
    is reused), on this host; a sweep on another host is taken to run (its processes are not visible)."""
    import socket

    import psutil

    if spec.get("host") != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(int(spec["pid"])).create_time() - float(spec["pid_started"])) < 1e-3
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def status(runs_root: str | Path) -> dict[str, Any]:
    """`pgolf sweep --status RUNS_ROOT`: every point of the sweeps under it (local and Slurm: each
    has a spec.json), with its state and, for Slurm, its job."""
    root = Path(runs_root).absolute()
    if not root.is_dir():
        raise PgolfError(f"{runs_root}: no such runs root")
    points = []
    for spec in sorted((root / JOBS).glob("*/spec.json")):
        run_dir = _read(spec).get("item", {}).get("run_dir")
        if run_dir:
            points.append(point_status(root, run_dir))
    counts: dict[str, int] = {}
    for p in points:
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    return {"runs_root": str(root), "points": points, "counts": counts}


# ---- the job

def run_point(job_dir: str) -> dict[str, Any]:
    """The job, on every node: the first runs the notebook, the others follow its torchrun launches."""
    import submitit

    job_dir_p = Path(job_dir)
    spec = json.loads((job_dir_p / "spec.json").read_text())
    env = submitit.JobEnvironment()
    job_id, node, nodes = str(env.job_id), env.global_rank, env.num_tasks  # one task per node
    launches = job_dir_p / f"launches-{job_id}"
    if nodes > 1:
        host = "127.0.0.1" if spec.get("cluster") == "local" else env.hostnames[0]
        port = RDZV_PORT + int(re.sub(r"\D", "", job_id) or 0) % 1000
        os.environ.update(launch.multinode_env(nodes, f"{host}:{port}", job_id, launches))
    if node > 0:
        launch.follow(launches)
        return {"node": node, "status": "followed"}
    run_dir = Path(spec["item"]["run_dir"])
    sweep.retire(run_dir, Path(spec["runs_root"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    notebook = run_dir / Path(spec["notebook"]).name
    record = {"job_id": job_id, "hosts": list(env.hostnames), "nodes": nodes, "notebook": str(notebook),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(run_dir / "job.json", {**record, "state": "RUNNING"})
    res: dict[str, Any] = {"status": "failed", "error": "interrupted"}
    try:
        res = sweep.execute(spec["notebook"], spec["item"], spec["runs_root"], cwd=spec["cwd"])
    finally:
        if nodes > 1:
            launch.end_launches(launches)
        state = "FINISHED" if res["status"] == "finished" else "FAILED"
        atomic_write_json(run_dir / "job.json", {**record, "state": state,
                                                 "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pgolf.lab.slurm JOB_DIR`: the command of a --dry-run sbatch script (one task per node)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pgolf.lab.slurm JOB_DIR", file=sys.stderr)
        return 2
    res = run_point(args[0])
    print(json.dumps(res, default=str))
    return 0 if res.get("status") in ("finished", "followed") else 1


if __name__ == "__main__":
    sys.exit(main())
