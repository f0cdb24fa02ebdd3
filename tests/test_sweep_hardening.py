"""pgolf sweep, hardened: names checked before the first point, config keys gridded into `overrides`,
a failed point keeps the child's own error line and the sweep exits 1, SIGTERM stops the sweep (143)
with the kernel and nothing recorded, and --nproc defaults to one process per visible GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from notebook_helpers import parameterised_notebook
from process_helpers import sigterm_when

from pgolf.lab import launch, sweep
from pgolf.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 'seed = 0\nrun_dir = ""\nnproc = 1\noverrides = []\nmode = "ok"\nflag = ""\n'
BODY = """\
import os, sys, time
from pgolf.lab import launch
from pgolf.runs import RunDir
if mode == "child_error":  # a training child that fails the way pgolf fails: one line, exit 2
    launch.stream([sys.executable, "-c", "import sys; print('step 1 loss 6.93'); "
                   "print('pgolf: error: data/x: no fineweb_train_*.bin shards found', file=sys.stderr); sys.exit(2)"])
if mode == "sleep":  # a long child, as a training run is: it writes its pid, the kernel's, and sleeps
    launch.stream([sys.executable, "-c",
                   f"import os, time; open({flag!r}, 'w').write(f'{{os.getpid()}} {os.getpid()}'); "
                   "time.sleep(120)"])
run = RunDir.create(run_dir)
run.write_json("config.json", {"train": {"seed": seed}})
run.finish({"preset": "dummy", "seed": seed, "val_loss": 2.0, "val_bpb": 1.0, "nproc": nproc, "overrides": overrides})
"""


def notebook(path: Path, params: str = PARAMS) -> Path:
    return parameterised_notebook(path, params, BODY)


@pytest.fixture
def nb(tmp_path):
    return notebook(tmp_path / "dummy.ipynb")


@pytest.mark.parametrize("case", ["not_a_notebook", "unknown_p", "unknown_grid", "unknown_key", "bad_value",
                                  "bad_fixed_value", "no_overrides_param", "no_run_dir_param"])
def test_bad_names_fail_before_the_first_point(case, nb, tmp_path, cli):
    target, extra = nb, []
    if case == "not_a_notebook":
        target = tmp_path / "train.py"
        target.write_text("print('hello')\n")
    elif case == "unknown_p":
        extra = ["-p", "presett", "cpu-smoke"]
    elif case == "unknown_grid":
        extra = ["--grid", "lr=0.1,0.2"]
    elif case == "unknown_key":
        extra = ["--grid", "model.attn_gate_widht=12,24"]
    elif case == "bad_value":
        extra = ["--grid", "model.num_heads=4,0"]
    elif case == "bad_fixed_value":
        extra = ["-p", "optim.beta2", "1.5"]
    elif case == "no_overrides_param":
        target = notebook(tmp_path / "plain.ipynb", PARAMS.replace("overrides = []\n", ""))
        extra = ["--grid", "model.attn_gate_width=12,24"]
    elif case == "no_run_dir_param":
        target = notebook(tmp_path / "norun.ipynb", PARAMS.replace('run_dir = ""\n', ""))
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", target, "--seeds", "1", "--nproc", "1", "--runs-root", root, *extra)
    assert rc == 2 and res is None, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgolf: error:"), err
    expect = {"not_a_notebook": "not a readable notebook", "unknown_p": "'presett'", "unknown_grid": "'lr'",
              "unknown_key": "model.attn_gate_widht", "bad_value": "model.num_heads: 0: expected >= 1",
              "bad_fixed_value": "-p optim.beta2=1.5: optim.beta2: 1.5: expected within [0, 1)",
              "no_overrides_param": "'overrides'", "no_run_dir_param": "'run_dir'"}[case]
    assert expect in lines[0]
    assert not root.exists() or not any(root.iterdir())  # no point ran


@pytest.mark.parametrize("extra, line", [
    (["-p", "preset", "nope"], '-p preset="nope": unknown preset \'nope\''),
    (["--grid", "preset=cpu-smoke,nope"], '--grid preset="nope": unknown preset \'nope\''),
    (["-p", "overrides", '["model.bogus=1"]'],
     '-p overrides (on preset "cpu-smoke"): --set model.bogus: unknown config key \'model.bogus\''),
    (["-p", "max_seconds", "-5"], "-p max_seconds=-5: expected a number >= 0 (0: the preset's budget)"),
    (["--grid", "max_seconds=10,NaN"], "--grid max_seconds=NaN: expected a number >= 0"),
], ids=["preset", "grid-preset", "overrides", "budget", "grid-budget"])
def test_train_notebook_values_fail_before_the_first_point(extra, line, tmp_path, cli):
    """train.ipynb's preset, its --set strings and its budget are checked before any kernel starts: each
    of these failed in every point's notebook (exit 1, a kernel and a Slurm job per point wasted)."""
    root = tmp_path / "runs"
    rc, res, err = cli("sweep", ROOT / "notebooks" / "train.ipynb", "--seeds", "1", "2", "--nproc", "1",
                       "--runs-root", root, "-p", "data", tmp_path / "data", *extra)
    lines = err.strip().splitlines()
    assert rc == 2 and res is None and len(lines) == 1 and lines[0].startswith(f"pgolf: error: {line}"), err
    assert not root.exists() or not any(root.iterdir())  # no point ran


def test_grid_config_keys_reach_the_overrides_parameter(nb, tmp_path, cli):
    items = sweep.plan(nb, [1], {"overrides": ["train.iterations=3"], "model.attn_gate": "attn_out"},
                       {"model.attn_gate_width": [12, 24], "mode": ["ok"]}, tmp_path)
    assert [i["parameters"]["overrides"] for i in items] == [
        ["train.iterations=3", 'model.attn_gate="attn_out"', "model.attn_gate_width=12"],
        ["train.iterations=3", 'model.attn_gate="attn_out"', "model.attn_gate_width=24"]]
    assert not [k for k in items[0]["parameters"] if "." in k] and items[0]["parameters"]["mode"] == "ok"
    assert Path(items[1]["run_dir"]).name.endswith("_model.attn-gate-width-24_mode-ok_s1")
    rc, res, err = cli("sweep", nb, "--seeds", "1", "--nproc", "1", "--runs-root", tmp_path / "runs",
                       "-p", "model.num_layers", "4", "--grid", 'model.attn_gate_input="q"')
    assert rc == 0, err
    assert RunDir(res["runs"][0]).result()["overrides"] == ["model.num_layers=4", 'model.attn_gate_input="q"']


def test_a_failed_point_keeps_the_child_error_and_exits_1(nb, tmp_path, capsys):
    from pgolf import cli

    root = tmp_path / "runs"
    rc = cli.main(["sweep", str(nb), "--seeds", "1", "--nproc", "1", "--runs-root", str(root),
                   "-p", "mode", "child_error"])
    out, err = capsys.readouterr()
    assert rc == 1
    res = json.loads(out.strip().splitlines()[-1])  # the JSON still comes, as the last stdout line
    (failed,) = res["failed"]
    assert failed["error"].startswith("PgolfError: pgolf: error: data/x: no fineweb_train_*.bin shards found")
    error = json.loads((Path(failed["run_dir"]) / "error.json").read_text())
    assert error["error"] == failed["error"] and error["status"] == "failed"
    assert "pgolf: 1 failed" in err


def test_error_line_picks_the_reason():
    assert launch.error_line(["step 1", "pgolf: error: model.x: bad", "torchrun: ChildFailedError"]) == \
        "pgolf: error: model.x: bad"
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1', "[rank0]: ZeroDivisionError: division by zero",
          "  more noise"]
    assert launch.error_line(tb) == "ZeroDivisionError: division by zero"
    assert launch.error_line(["a", "last words", ""]) == "last words" and launch.error_line([]) == ""


def test_sigterm_stops_the_sweep_its_kernel_and_records_nothing(nb, tmp_path):
    root, flag = tmp_path / "runs", tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pgolf.cli", "sweep", str(nb), "--seeds", "1", "2", "--nproc", "1",
                             "--runs-root", str(root), "-p", "mode", "sleep", "-p", "flag", str(flag)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    out, err = sigterm_when(proc, lambda: flag.exists() and bool(flag.read_text()))
    child, kernel = map(int, flag.read_text().split())  # the first point's kernel runs a long child
    assert proc.returncode == 143, err[-2000:]
    assert "pgolf: terminated (SIGTERM)" in err and out.strip() == ""
    points = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))  # .jobs: the specs
    assert len(points) == 1  # the second point never started
    error = json.loads((points[0] / "error.json").read_text())
    assert error["status"] == "interrupted" and not RunDir(points[0]).is_finished()
    assert not (root / "index.jsonl").exists()
    time.sleep(0.5)
    for pid in (child, kernel):  # the kernel is gone, and the child it started is not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_nproc_defaults_to_one_per_visible_gpu(tmp_path, monkeypatch, nb):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(8)))
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launch.default_nproc() == 8
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launch.default_nproc() == 2
    seen = []
    monkeypatch.setattr(sweep, "execute", lambda nb_, item, *a, **k: seen.append(item) or {"status": "finished"})
    res = sweep.sweep(nb, [1], runs_root=tmp_path / "runs")
    assert res["nproc"] == 2 and seen[0]["parameters"]["nproc"] == 2
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi: a CPU machine
    assert launch.default_nproc() == 1
