"""`pgolf sweep --launcher slurm`: sbatch scripts (--dry-run), jobs through submitit's local executor,
--status, resubmission of failed points only, a script run as Slurm would run it (a stand-in srun), and
a two-node job whose training equals the one-node run.

No Slurm here: the dry-run scripts are executed by bash with `srun` replaced by a script that starts
the command once per task with the variables a Slurm task sees (SLURM_PROCID, SLURM_JOB_NODELIST...).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from notebook_helpers import parameterised_notebook

from pgolf.errors import PgolfError
from pgolf.lab import slurm
from pgolf.runs import RunDir

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
PARAMS = 'seed = 0\nrun_dir = ""\nfail_flag = ""\nnproc = 1\nscale = 1.0\n'
BODY = """\
import os
from pgolf.runs import RunDir
if fail_flag and os.path.exists(fail_flag):
    raise ValueError(f"seed {seed} fails on purpose")
run = RunDir.create(run_dir)
run.write_json("config.json", {"model": {"scale": scale}, "train": {"seed": seed}})
run.finish({"preset": "dummy", "seed": seed, "val_bpb": scale, "nproc": nproc})
"""
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256", "train.val_batch_tokens=4096", "data.val_max_tokens=4096",
        "train.log_every=1", 'train.export="none"', "train.iterations=4", "train.warmup_steps=0"]
# A stand-in for srun: each task runs the command with the variables a Slurm task sees, its output in
# the --output / --error files with %j and %t filled in, as srun does.
FAKE_SRUN = r"""#!/bin/bash
out=""; err=""
while [[ "$1" == --* ]]; do
  case "$1" in --output) out="$2"; shift 2;; --error) err="$2"; shift 2;; *) shift;; esac
done
n=${SLURM_JOB_NUM_NODES:-1}; pids=()
for ((t = 0; t < n; t++)); do
  o=${out//%j/$SLURM_JOB_ID}; o=${o//%t/$t}; e=${err//%j/$SLURM_JOB_ID}; e=${e//%t/$t}
  SLURM_PROCID=$t SLURM_NODEID=$t SLURM_LOCALID=0 SLURM_NTASKS=$n "$@" >"$o" 2>"$e" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.fixture
def dummy_nb(tmp_path):
    return parameterised_notebook(tmp_path / "dummy.ipynb", PARAMS, BODY)


def run_script(script: Path, tmp_path: Path, job_id: str, nodes: int = 1) -> subprocess.CompletedProcess:
    """`bash job.sbatch` as a Slurm job of `nodes` nodes (all this machine) with job id `job_id`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": job_id,
           "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes),
           "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu"}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)


def test_time_and_sbatch_options():
    assert [slurm.parse_time(t) for t in ("90", "1:30:00", "0:45", "2-00", "1-02:03", "0:00:01")] == \
        [90, 90, 1, 2880, 1563, 1]  # M, H:M:S, M:S (45 s -> 1 min), D-H, D-H:M, rounded up
    assert slurm.parse_sbatch(["qos=high", "--exclusive", "constraint=h100|a100"]) == \
        {"qos": "high", "exclusive": True, "constraint": "h100|a100"}
    for bad in ("1:2:3:4", "soon", "0"):
        with pytest.raises(PgolfError, match="--time"):
            slurm.parse_time(bad)
    with pytest.raises(PgolfError, match="--sbatch"):
        slurm.parse_sbatch(["qos="])


def test_dry_run_writes_one_sbatch_script_per_point(tmp_path, cli):
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", NB_DIR / "train.ipynb", "--launcher", "slurm", "--seeds", "1", "2",
                       "--grid", "model.attn_gate_width=12,24", "--dry-run", "--runs-root", root,
                       "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1:30:00",
                       "--account", "golf", "--sbatch", "qos=high", "--sbatch", "exclusive")
    assert rc == 0, err
    assert res["dry_run"] and res["submitted"] == [] and res["points"] == 4 and res["nproc"] == 8
    assert res["runs"] == res["failed"] == [] and res["waited"] is False  # the contract's keys, always there
    scripts = [Path(s) for s in res["scripts"]]
    assert len(scripts) == 4 and all(s.is_file() for s in scripts)
    assert sorted(s.parent.name.split("width-")[1] for s in scripts) == ["12_s1", "12_s2", "24_s1", "24_s2"]
    text = scripts[0].read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --account=golf",
                 "#SBATCH --qos=high", "#SBATCH --exclusive", "export SUBMITIT_EXECUTOR=slurm"):
        assert line in text.splitlines(), line
    assert text.splitlines()[-1].startswith("srun ") and \
        text.splitlines()[-1].endswith(f"-m pgolf.lab.slurm {scripts[0].parent}")
    spec = json.loads((scripts[0].parent / "spec.json").read_text())
    assert spec["nodes"] == 2 and spec["item"]["parameters"]["overrides"] == ["model.attn_gate_width=12"]
    assert spec["item"]["parameters"]["nproc"] == 8  # torchrun processes per node = GPUs per node
    assert not any(p.name != ".jobs" for p in root.iterdir())  # nothing submitted, no run directory yet
    rc, _, err = cli("sweep", NB_DIR / "train.ipynb", "--nodes", "2", "--runs-root", root)
    assert rc == 2 and "--nodes: only with --launcher slurm" in err


def test_a_dry_run_script_runs_as_a_slurm_job(dummy_nb, tmp_path, cli):
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", dummy_nb, "--launcher", "slurm", "--seeds", "3", "--dry-run", "--runs-root", root)
    assert rc == 0, err
    r = run_script(Path(res["scripts"][0]), tmp_path, "4242")
    assert r.returncode == 0, r.stderr
    run_dir = root / Path(res["scripts"][0]).parent.name
    assert RunDir(run_dir).is_finished() and RunDir(run_dir).result()["seed"] == 3
    job = json.loads((run_dir / "job.json").read_text())
    assert job["job_id"] == "4242" and job["state"] == "FINISHED" and job["hosts"] == ["localhost"]
    assert Path(job["notebook"]).is_file() and Path(job["notebook"]).parent == run_dir  # the executed notebook
    out = (Path(res["scripts"][0]).parent / "4242_0_log.out").read_text()
    assert json.loads(out.strip().splitlines()[-1])["status"] == "finished"
    [point] = cli("sweep", "--status", root)[1]["points"]  # submitted by hand: known from the job's record
    assert (point["status"], point["job_id"], point["state"]) == ("finished", "4242", "FINISHED")


def test_submitting_without_wait_reports_runs_and_failed_empty(dummy_nb, tmp_path, cli, monkeypatch):
    """Without --wait the jobs' outcome is unknown: `runs` / `failed` (the contract's keys) are empty
    lists and `waited` says so; `submitted` lists the jobs."""
    class Job:
        job_id = "77"

    class Executor:
        def submit(self, fn, job_dir):
            return Job()
    monkeypatch.setattr(slurm, "_executor", lambda folder, opts, name: Executor())
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", dummy_nb, "--launcher", "slurm", "--seeds", "1", "--runs-root", root)
    assert rc == 0, err
    assert res["runs"] == [] and res["failed"] == [] and res["waited"] is False
    assert [s["job_id"] for s in res["submitted"]] == ["77"] and res["points"] == 1


@pytest.mark.slow
def test_local_jobs_status_and_resubmission_of_failed_points_only(dummy_nb, tmp_path, cli):
    root, flag = tmp_path / "runs", tmp_path / "FAIL"
    argv = ["sweep", dummy_nb, "--launcher", "slurm", "--cluster", "local", "--seeds", "7",
            "--runs-root", root]
    flag.touch()
    rc, _, err = cli(*argv, "--grid", f"fail_flag=,{flag}")  # the point with the flag fails while it exists
    assert rc == 1 and "1 failed" in err
    st = cli("sweep", "--status", root)[1]
    assert st["counts"] == {"finished": 1, "failed": 1}
    failed = [p for p in st["points"] if p["status"] == "failed"]
    assert failed[0]["error"] == "ValueError: seed 7 fails on purpose"
    assert not failed[0]["run_dir"].endswith("fail-flag-x_s7")  # the point with the flag (an empty one: x)
    assert all(p["state"] == "FAILED" and p["attempts"] == 1 for p in failed)
    first = {p["run_dir"]: p["job_id"] for p in st["points"]}
    flag.unlink()
    rc, res, err = cli(*argv, "--grid", f"fail_flag=,{flag}")
    assert rc == 0, err
    assert sorted(s["run_dir"] for s in res["submitted"]) == sorted(p["run_dir"] for p in failed)
    assert sorted(res["skipped"]) == sorted(set(first) - {p["run_dir"] for p in failed})
    st = cli("sweep", "--status", root)[1]
    assert st["counts"] == {"finished": 2}
    for p in st["points"]:
        job = json.loads((Path(p["run_dir"]) / "job.json").read_text())
        assert job["job_id"] == p["job_id"] and (p["attempts"] == 2) == (p["run_dir"] in [f["run_dir"] for f in failed])
        assert Path(p["notebook"]).is_file() and RunDir(p["run_dir"]).is_finished()
    assert len(list((root / ".failed").iterdir())) == 1  # the failed attempt, kept aside


@pytest.mark.slow
def test_local_executor_runs_the_train_notebook_jobs(sp1024_data, tmp_path, cli, monkeypatch):
    """The acceptance sweep: 2 seeds x 2 gate widths of train.ipynb, four jobs, each run finished."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PGOLF_DEVICE", "cpu")
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", NB_DIR / "train.ipynb", "--launcher", "slurm", "--cluster", "local",
                       "--seeds", "1", "2", "--grid", "model.attn_gate_width=12,24", "-p", "data", sp1024_data,
                       "-p", "overrides", json.dumps(TINY), "-p", "figures_dir", tmp_path / "fig",
                       "--runs-root", root)
    assert rc == 0, err
    assert len(res["submitted"]) == 4 and len(res["runs"]) == 4 and res["failed"] == []
    st = cli("sweep", "--status", root)[1]
    assert st["counts"] == {"finished": 4}
    widths = set()
    for p in st["points"]:
        result = RunDir(p["run_dir"]).result()
        widths.add(RunDir(p["run_dir"]).config()["model"]["attn_gate_width"])
        assert result["status"] == "finished" and result["steps"] == 4
        assert json.loads((Path(p["run_dir"]) / "job.json").read_text())["job_id"] == p["job_id"]
        assert nbformat.read(p["notebook"], as_version=4).cells[-1].get("execution_count")
    assert widths == {12, 24}


@pytest.mark.slow
def test_two_node_job_equals_the_one_node_run(sp1024_data, tmp_path, cli):
    """A 2-node sbatch script (both "nodes" on this machine, gloo, fp32): the notebook's torchrun and the
    second node's follower meet in one c10d rendezvous (`torchrun --nnodes 2 --rdzv-backend c10d`), and
    the 10 losses equal those of a one-node run of the same config.json at the same global batch."""
    root = tmp_path / "runs"
    ten = [o for o in TINY if not o.startswith("train.iterations")] + ["train.iterations=10", 'train.export="int8"']
    rc, res, err = cli("sweep", NB_DIR / "train.ipynb", "--launcher", "slurm", "--nodes", "2", "--seeds", "5",
                       "-p", "data", sp1024_data, "-p", "overrides", json.dumps(ten),
                       "-p", "figures_dir", tmp_path / "fig", "--dry-run", "--runs-root", root)
    assert rc == 0, err
    script = Path(res["scripts"][0])
    r = run_script(script, tmp_path, "777", nodes=2)
    run_dir = root / script.parent.name
    assert r.returncode == 0, (script.parent / "777_0_log.err").read_text()[-3000:]
    two = RunDir(run_dir).result()
    assert two["status"] == "finished" and two["world_size"] == 2 and two["steps"] == 10
    assert json.loads((run_dir / "job.json").read_text())["nodes"] == 2
    launches = sorted(p.name for p in (script.parent / "launches-777").iterdir())
    assert launches == ["0000.json", "done"]  # one launch, joined by the second node
    spec = json.loads((script.parent / "launches-777" / "0000.json").read_text())
    assert spec["rdzv_id"] == "777-0" and spec["nproc"] == 1
    one = subprocess.run([sys.executable, "-m", "pgolf.train", "--config", str(run_dir / "config.json"),
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu"})
    assert one.returncode == 0, one.stderr[-2000:]
    l1, l2 = losses(tmp_path / "one"), losses(run_dir)
    assert len(l1) == len(l2) == 10 and len(set(l1)) == 10  # ten real steps
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l2)) <= 1e-5
    # the int8 artifact, scored on both nodes from rank 0's bytes (sent, not re-read from its disk)
    ref = RunDir(tmp_path / "one").result()
    assert two["model_bytes"] == ref["model_bytes"]
    assert abs(two["artifact_val_bpb"] / ref["artifact_val_bpb"] - 1) <= 1e-5


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.parametrize("recorded, scheduler, status, state", [
    (None, None, "new", None),  # never submitted
    (None, "PENDING", "active", "PENDING"),
    (None, "UNKNOWN", "active", "UNKNOWN"),  # just submitted: sacct has not seen it yet
    ("RUNNING", "RUNNING", "active", "RUNNING"),
    ("RUNNING", "TIMEOUT", "failed", "RUNNING"),  # killed at its time limit before it could record its end
    ("RUNNING", "UNKNOWN", "active", "RUNNING"),  # no sacct answer: trust the job's record
    ("FAILED", "REQUEUED", "active", "REQUEUED"),  # preempted, recorded FAILED, requeued under its id
    ("FAILED", "FAILED", "failed", "FAILED"),
])
def test_point_status_joins_the_job_record_and_the_scheduler(recorded, scheduler, status, state, tmp_path,
                                                             monkeypatch):
    root = tmp_path / "runs"
    run_dir = root / "train-abc_s1"
    asked = []
    monkeypatch.setattr(slurm, "_scheduler_state", lambda cluster, job_id, job_dir: asked.append(job_id) or scheduler)
    if scheduler is not None:
        (root / ".jobs" / run_dir.name).mkdir(parents=True)
        (root / ".jobs" / run_dir.name / "jobs.json").write_text(json.dumps([{"job_id": "99", "cluster": "slurm"}]))
    if recorded is not None:
        run_dir.mkdir(parents=True)
        (run_dir / "job.json").write_text(json.dumps({"job_id": "99", "state": recorded}))
    got = slurm.point_status(root, run_dir)
    assert (got["status"], got["state"]) == (status, state)
    assert asked == ([] if scheduler is None else ["99"])
    if status == "failed" and recorded == "RUNNING":
        assert got["error"] == "job 99 ended (TIMEOUT) without a finished run"
