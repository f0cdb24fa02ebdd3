"""pgolf sweep: one papermill execution per seed x grid point, failures recorded, finished runs skipped.

The sweep's mechanics are tested on a tiny notebook that finishes a run through RunDir (no training);
the acceptance sweep over notebooks/train.ipynb lives in test_notebooks.py.
"""
import json
import shutil
from pathlib import Path

import nbformat
import pytest
from notebook_helpers import parameterised_notebook

from pgolf import cli
from pgolf.lab import sweep
from pgolf.errors import PgolfError
from pgolf.lab.registry import load
from pgolf.runs import RunDir

PARAMS = 'seed = 0\nrun_dir = ""\nscale = 1.0\nfail_at = -1\nfail_flag = ""\nnproc = 1\n'
BODY = """\
import os
from pgolf.runs import RunDir
if seed == fail_at and os.path.exists(fail_flag):
    raise ValueError(f"seed {seed} fails on purpose")
run = RunDir.create(run_dir)
run.write_json("config.json", {"model": {"scale": scale}, "train": {"seed": seed}})
run.finish({"preset": "dummy", "seed": seed, "val_loss": 2.0 * scale, "val_bpb": scale, "nproc": nproc})
"""


@pytest.fixture
def dummy_nb(tmp_path):
    return parameterised_notebook(tmp_path / "dummy.ipynb", PARAMS, BODY)


def test_plan_names_are_deterministic(tmp_path):
    grid = sweep.parse_grid(["scale=0.5,2", "gate=sparse"])
    assert grid == {"scale": [0.5, 2], "gate": ["sparse"]}
    p1 = sweep.plan("nb/train.ipynb", [1, 2], {"preset": "cpu-smoke"}, grid, tmp_path)
    p2 = sweep.plan("other/train.ipynb", [1, 2], {"preset": "cpu-smoke"}, grid, tmp_path)
    assert [x["run_dir"] for x in p1] == [x["run_dir"] for x in p2]  # depends on the stem, not the folder
    names = [Path(x["run_dir"]).name for x in p1]
    assert len(set(names)) == 4 and names[0].startswith("train-") and names[0].endswith("scale-0.5_gate-sparse_s1")
    assert p1[0]["parameters"] == {"preset": "cpu-smoke", "scale": 0.5, "gate": "sparse", "seed": 1,
                                   "run_dir": p1[0]["run_dir"], "runs_root": str(tmp_path.absolute())}
    other = sweep.plan("train.ipynb", [1], {"preset": "pr1855"}, {}, tmp_path)[0]["run_dir"]
    smoke = sweep.plan("train.ipynb", [1], {"preset": "cpu-smoke"}, {}, tmp_path)[0]["run_dir"]
    assert Path(other).name != Path(smoke).name
    for bad in (["scale"], ["scale="], ["1x=2"]):
        with pytest.raises(PgolfError):
            sweep.parse_grid(bad)
    with pytest.raises(PgolfError, match="set by the sweep"):
        sweep.plan("t.ipynb", [1], {"seed": 3}, {}, tmp_path)
    assert sweep.parse_value("20") == 20 and sweep.parse_value("cpu-smoke") == "cpu-smoke"
    assert sweep.parse_value('["model.num_layers=2"]') == ["model.num_layers=2"]


def test_plan_never_puts_two_points_in_one_folder(tmp_path):
    """Values whose plain name parts would be the same (long paths, `_` against `-`) get a hash of their
    text; repeated seeds or grid values are refused rather than run once and reported "skipped"."""
    long_a, long_b = (f"/data/sample_copy_with_a_long_descriptive_name_{x}" for x in "AB")
    for values in ([long_a, long_b], ["attn_out", "attn-out"]):
        items = sweep.plan("train.ipynb", [1], {}, {"data": values}, tmp_path)
        names = [Path(i["run_dir"]).name for i in items]
        assert len(set(names)) == 2, names
    assert Path(sweep.plan("train.ipynb", [1], {}, {"gate": ["sparse"]}, tmp_path)[0]["run_dir"]).name.endswith(
        "_gate-sparse_s1")  # a plain short value keeps its plain name (earlier sweeps' folders still match)
    with pytest.raises(PgolfError, match="seed 1 given twice"):
        sweep.plan("train.ipynb", [1, 1], {}, {}, tmp_path)
    with pytest.raises(PgolfError, match="--grid scale: value 2 given twice"):
        sweep.plan("train.ipynb", [1], {}, {"scale": [2, 0.5, 2]}, tmp_path)


def test_data_folders_are_checked_before_any_point_and_a_silent_failure_says_why(tmp_path, capsys, monkeypatch):
    """A notebook with a `data` parameter (train.ipynb's): a missing data folder, given or the notebook's
    default, is one error line before any point runs. A notebook that ends without finishing its run
    (train.ipynb prints why and skips its cells) has its last printed line in the failure."""
    monkeypatch.chdir(tmp_path)
    body = 'print("first line")\nprint("the reason: nothing to do")\n'
    nb = parameterised_notebook(tmp_path / "d.ipynb", 'seed = 0\nrun_dir = ""\ndata = "nowhere"\nnproc = 1\n', body)
    root = tmp_path / "runs"
    argv = ["sweep", str(nb), "--seeds", "1", "--nproc", "1", "--runs-root", str(root)]
    assert cli.main(argv) == 2
    assert f"{nb}'s default data=\"nowhere\": " in capsys.readouterr().err
    assert cli.main(argv + ["-p", "data", "elsewhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("pgolf: error:") == 1 and f'-p data="elsewhere": {tmp_path / "elsewhere"}: no data folder' in err
    assert not root.exists() or not any(root.iterdir())
    data = tmp_path / "d"
    data.mkdir()
    (data / "fineweb_val_000000.bin").touch()
    assert cli.main(argv + ["-p", "data", str(data)]) == 1
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["failed"][0]["error"].endswith("; its last output: the reason: nothing to do")


def test_sweep_records_failures_and_skips_finished(tmp_path, dummy_nb, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs"
    flag = tmp_path / "FAIL"
    flag.touch()
    argv = ["sweep", str(dummy_nb), "--seeds", "1", "2", "-p", "fail_at", "2", "-p", "fail_flag", str(flag),
            "--grid", "scale=0.5", "--nproc", "1", "--runs-root", str(root)]
    assert cli.main(argv) == 1  # a failed point: the JSON is printed, then a non-zero exit
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert len(res["runs"]) == 1 and len(res["failed"]) == 1 and res["skipped"] == []
    ok, bad = Path(res["runs"][0]), Path(res["failed"][0]["run_dir"])
    assert RunDir(ok).is_finished() and RunDir(ok).result()["seed"] == 1
    assert RunDir(ok).result()["nproc"] == 1  # --nproc reaches the notebook
    assert (ok / "dummy.ipynb").exists() and (bad / "dummy.ipynb").exists()  # executed notebooks kept
    executed = nbformat.read(ok / "dummy.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    error = json.loads((bad / "error.json").read_text())
    assert error["status"] == "failed" and "fails on purpose" in error["error"]
    assert not RunDir(bad).is_finished() and "fails on purpose" in res["failed"][0]["error"]
    assert "sweep dummy.ipynb" in err  # the progress bar is on stderr
    assert len(load(root)) == 1

    # Re-run once the cause is gone: the finished point is skipped, the failed one retried (its
    # old attempt moved to .failed/, not deleted), and the index gains exactly one line.
    flag.unlink()
    assert cli.main(argv) == 0
    res2 = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert res2["skipped"] == [str(ok)] and res2["runs"] == [str(bad)] and res2["failed"] == []
    assert RunDir(bad).is_finished() and not (bad / "error.json").exists()
    (moved,) = (root / ".failed").iterdir()
    assert moved.name.startswith(bad.name + "-") and (moved / "error.json").exists()
    assert len((root / "index.jsonl").read_text().splitlines()) == 2

    # --status sees the local sweep's points (its spec.json per point), not only Slurm jobs
    assert cli.main(["sweep", "--status", str(root)]) == 0
    st = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert st["counts"] == {"finished": 2}
    assert sorted(p["run_dir"] for p in st["points"]) == sorted([str(ok), str(bad)])
    assert all(p["launcher"] == "local" and p["job_id"] is None and p["state"] == "FINISHED" for p in st["points"])
    assert all(Path(p["notebook"]) == Path(p["run_dir"]) / "dummy.ipynb" for p in st["points"])
    assert {p["run_dir"]: p["attempts"] for p in st["points"]} == {str(ok): 1, str(bad): 2}  # .failed/ counts
    assert cli.main(["stats", "*", "--runs-root", str(root), "--pool"]) == 0  # .jobs and .failed are no runs
    assert json.loads(capsys.readouterr()[0].strip().splitlines()[-1])["skipped"] == []


def test_sweep_bad_input(tmp_path, capsys):
    rc = cli.main(["sweep", str(tmp_path / "missing.ipynb"), "--runs-root", str(tmp_path)])
    assert rc == 2 and "notebook not found" in capsys.readouterr()[1]


@pytest.mark.parametrize("launcher", [[], ["--launcher", "slurm", "--dry-run"]], ids=["local", "slurm"])
def test_a_runs_root_that_is_a_file_is_one_error_line(launcher, tmp_path, dummy_nb, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for root in (blocker, blocker / "under"):
        rc = cli.main(["sweep", str(dummy_nb), "--seeds", "1", "--runs-root", str(root), *launcher])
        out, err = capsys.readouterr()
        assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("pgolf: error: --runs-root "), err
    assert blocker.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dummy.ipynb"]


def test_status_of_local_points_while_their_sweep_runs_and_after(tmp_path):
    from pgolf.lab import slurm

    root = tmp_path / "runs"
    [item] = sweep.plan("dummy.ipynb", [1], {}, {}, root)
    run_dir = Path(item["run_dir"])

    def status():
        [p] = slurm.status(root)["points"]
        return p["launcher"], p["status"], p["state"]

    me = sweep._this_sweep()  # this process plays the sweep: alive
    sweep.write_spec(root, tmp_path / "dummy.ipynb", item, "local", **me)
    assert status() == ("local", "active", "PENDING")  # queued behind other points
    run_dir.mkdir()
    (run_dir / "papermill.log").write_text("")
    assert status() == ("local", "active", "RUNNING")
    (run_dir / "error.json").write_text(json.dumps({"status": "failed", "error": "ValueError: no"}))
    assert status() == ("local", "failed", "FAILED")
    (run_dir / "error.json").unlink()
    sweep.write_spec(root, tmp_path / "dummy.ipynb", item, "local", **{**me, "pid_started": 1.0})  # a reused pid
    assert status() == ("local", "failed", "ENDED")  # the sweep is gone and left the point unfinished
    shutil.rmtree(run_dir)
    assert status() == ("local", "new", None)
