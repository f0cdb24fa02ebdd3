"""The workbench notebooks: committed clean (what git holds, not the working tree: a notebook run and
saved in JupyterLab must not fail the suite), the project's kernel, and each executes headless under
papermill on CPU, with runs and with an empty runs/ (then it says what to run first).

train.ipynb is executed the way the issue's acceptance does it, through `pgolf sweep` with two seeds
(a tiny model and a few seconds each, to keep the suite short), then re-run to check that finished
runs are skipped.
"""
import ast
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from pgolf import cli
from pgolf.lab import launch, workbench
from pgolf.errors import PgolfError
from pgolf.presets import get_preset
from pgolf.lab.registry import load
from pgolf.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
# Every notebook the test suite executes. A listed notebook that is missing fails the test.
NOTEBOOKS = ["train.ipynb", "architecture_tweaks.ipynb", "bpb_vs_artifact.ipynb", "gptq_precision_vs_bytes.ipynb",
             "ttt_convergence.ipynb"]
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_batch_tokens=2048", "train.val_batch_tokens=8192", "data.val_max_tokens=8192"]


def literal_assignments(source):
    """The names assigned in a parameters cell; fails unless every statement is `name = <literal>`."""
    names = []
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        assert isinstance(node.targets[0], ast.Name), ast.unparse(node)
        ast.literal_eval(node.value)  # raises on anything but a literal
        names.append(node.targets[0].id)
    return names


def committed(path, root=ROOT):
    """The notebook as git holds it for the next commit (the index; a file git does not track yet, or a
    tree that is not a git checkout: the file itself). The working tree may hold a run's outputs."""
    rel = Path(path).relative_to(root)
    r = subprocess.run(["git", "-C", str(root), "show", f":{rel}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else Path(path).read_text()


def check_clean(text, name):
    """No outputs or execution counts, and exactly one `parameters` cell of literal assignments."""
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit without outputs"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: exactly one cell tagged 'parameters'"
    names = literal_assignments(params[0].source)
    assert len(names) == len(set(names)) and names
    return nb


@pytest.mark.parametrize("path", sorted(NB_DIR.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_clean_with_one_literal_parameters_cell_and_the_project_kernel(path):
    nb = check_clean(committed(path), path.name)
    assert nb.metadata.kernelspec.name == "pgolf", f"{path.name}: the project's kernel (make installs it)"


def test_make_installs_the_kernel_the_notebooks_name():
    assert "ipykernel install --sys-prefix --name pgolf" in (ROOT / "Makefile").read_text()


def git(repo, *args, **kw):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, **kw).stdout


def test_a_notebook_saved_with_outputs_neither_fails_the_check_nor_reaches_a_commit(tmp_path):
    """In a fresh clone `make` installs the clean filter; a notebook then run and saved (with outputs,
    counts and widget state) shows no change, stages clean, and the clean check above passes."""
    repo = tmp_path / "clone"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / ".gitattributes", repo)
    shutil.copy(ROOT / "scripts" / "nbstrip.py", repo / "scripts")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    subprocess.run(["make", "-s", "-C", str(repo), "-f", str(ROOT / "Makefile"), "git-filter"], check=True)
    assert git(repo, "config", "filter.nbstrip.clean").strip().endswith("scripts/nbstrip.py")
    path = repo / "notebooks" / "bpb_vs_artifact.ipynb"
    path.write_text(committed(NB_DIR / "bpb_vs_artifact.ipynb"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "notebooks")
    nb = nbformat.reads(path.read_text(), as_version=4)  # as JupyterLab saves it after a run
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[-1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="3 finished runs\n")]
    code[-1].execution_count = 7
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.9", "mimetype": "text/x-python"}
    nbformat.write(nb, path)
    assert "3 finished runs" in path.read_text()
    assert git(repo, "diff", "--name-only") == ""  # git compares the cleaned notebook: no change
    check_clean(committed(path, repo), path.name)
    git(repo, "add", "-A")
    assert git(repo, "diff", "--cached", "--name-only") == ""  # staging it stages nothing
    assert git(repo, "status", "--porcelain") == ""
    check_clean(committed(path, repo), path.name)
    # Without the filter the outputs would be staged, and the check would catch them.
    git(repo, "-c", "filter.nbstrip.clean=cat", "add", "--renormalize", ".")
    with pytest.raises(AssertionError, match="commit without outputs"):
        check_clean(committed(path, repo), path.name)


def test_listed_notebooks_exist():
    for name in NOTEBOOKS:
        assert (NB_DIR / name).is_file(), f"notebooks/{name} is listed but missing"


# No cell of these tiny configurations takes a minute; a cell past this never got its reply back.
CELL_TIMEOUT_S = 300


def execute(name, out_dir, **params):
    """Run a notebook headless. A cell that times out is a lost kernel message (the kernel sat idle with
    the cell marked running: a known papermill / jupyter_client hang, once in a CI run), so the notebook
    runs once more from the start; an error in a cell fails at once, and a second timeout fails."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    out = Path(out_dir) / name
    for attempt in (1, 2):
        try:
            pm.execute_notebook(str(NB_DIR / name), str(out), parameters=params, kernel_name="python3",
                                progress_bar=False, cwd=str(out_dir), execution_timeout=CELL_TIMEOUT_S)
            break
        except CellTimeoutError:
            if attempt == 2:
                raise
    return nbformat.read(out, as_version=4)


def fake_run(root, name, key, seed, loss, total_bytes):
    run = RunDir.create(root / name)
    run.write_json("config.json", {"model": {"key": key}, "train": {"seed": seed}})
    bpb = loss / math.log(2) / 2.4  # as after `pgolf quantize`: val_bpb is the artifact's score
    run.finish({"preset": key, "seed": seed, "val_loss": loss, "val_bpb": bpb, "quant_val_bpb": bpb,
                "val_bpb_prequant": bpb - 0.01, "total_bytes": total_bytes})


def cli_sweep(root, data):
    """`pgolf sweep notebooks/train.ipynb --seeds 1 2 ...` in-process; returns its final JSON."""
    argv = ["sweep", str(NB_DIR / "train.ipynb"), "--seeds", "1", "2", "-p", "preset", "cpu-smoke",
            "-p", "data", str(data), "-p", "max_seconds", "2", "-p", "overrides", json.dumps(TINY),
            "-p", "figures_dir", str(root / "figures"), "--runs-root", str(root / "runs")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def train_sweep(tmp_path_factory, sp1024_data):
    """Two tiny training runs made by sweeping train.ipynb (also the input of the analysis notebooks)."""
    root = tmp_path_factory.mktemp("train_sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # kernels and trainers: two shared cores, no thread spinning
        return root, cli_sweep(root, sp1024_data), sp1024_data


def check_train(tmp_path, request, monkeypatch):
    root, res, data = request.getfixturevalue("train_sweep")
    assert res["failed"] == [] and res["skipped"] == [] and len(res["runs"]) == 2
    results = [RunDir(r).result() for r in res["runs"]]
    assert [r["status"] for r in results] == ["finished", "finished"]
    assert sorted(r["seed"] for r in results) == [1, 2]
    for r, result in zip(res["runs"], results):
        assert (Path(r) / "train.ipynb").is_file() and (Path(r) / "result.json").is_file()
        assert (root / "figures" / f"loss_{Path(r).name}.png").is_file()
        logged = [m for m in RunDir(r).read_metrics() if "train_loss" in m]
        assert result["train_loss"] == logged[-1]["train_loss"] and result["steps"] == logged[-1]["step"]
        # the live view followed the run: a figure while it trained, then every phase named
        nb = nbformat.read(Path(r) / "train.ipynb", as_version=4)
        cell = next(c for c in nb.cells if "live.train(" in c.source)
        assert any("image/png" in o.get("data", {}) for o in cell.outputs)
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert re.search(r": finished; starting [\d.]+ s · training [\d.]+ s · validation [\d.]+ s · "
                         r"export / quantisation [\d.]+ s", text), text[-2000:]
    assert len((root / "runs" / "index.jsonl").read_text().splitlines()) == 2
    assert len(load(root / "runs")) == 2
    assert not (root / "runs" / ".failed").exists()  # the config.json the notebook wrote is no earlier attempt
    again = cli_sweep(root, data)
    assert sorted(again["skipped"]) == sorted(res["runs"]) and again["runs"] == [] and again["failed"] == []
    assert len((root / "runs" / "index.jsonl").read_text().splitlines()) == 2


def check_architecture_tweaks(tmp_path, request, monkeypatch):
    nb = execute("architecture_tweaks.ipynb", tmp_path, figures_dir=str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "architecture_bytes.png").is_file()
    assert (tmp_path / "fig" / "architecture_bytes.svg").is_file()
    # the check cell (widgets == headless) ran, and the notebook ends with a message (no runs needed)
    assert any("set_widget_values" in c.source and c.get("execution_count") for c in nb.cells)
    assert "To train them: the buttons above" in last_text(nb)


def check_bpb_vs_artifact(tmp_path, request, monkeypatch):
    root = tmp_path / "runs"
    for i, loss in enumerate([2.3300, 2.3320, 2.3340]):
        fake_run(root, f"ref_s{i}", "ref", i, loss, 15_500_000)
    for i, loss in enumerate([2.3150, 2.3170, 2.3190]):
        fake_run(root, f"new_s{i}", "new", i, loss, 15_900_000)
    nb = execute("bpb_vs_artifact.ipynb", tmp_path, runs_root=str(root), figures_dir=str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "bpb_vs_artifact.png").is_file()
    table = [o for o in nb.cells[-1].outputs if o.output_type == "display_data"][0].data["text/plain"]
    assert "True" in table  # the significance table: new beats ref by 0.015 nats with p ~ 0.002
    assert re.search(r"\bref\b.*\bnew\b", table)  # configurations named (by their presets here), not hashed
    assert "1 pair(s) of configurations tested on val_bpb." in last_text(nb)


def check_gptq_precision_vs_bytes(tmp_path, request, monkeypatch):
    _, res, _ = request.getfixturevalue("train_sweep")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fast = ["quant.passthrough_numel=4096", "quant.eval_max_tokens=8192", "quant.level=9", 'quant.compressor="zstd"']
    execute("gptq_precision_vs_bytes.ipynb", tmp_path, run_dir=res["runs"][0], bits=[6], clips=[12.85],
            lqer_ranks=[0], overrides=fast, figures_dir=str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "gptq_precision_vs_bytes.png").is_file()


def check_ttt_convergence(tmp_path, request, monkeypatch):
    _, res, _ = request.getfixturevalue("train_sweep")
    run = res["runs"][1]  # not the one the GPTQ notebook quantised
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ttt = ["--set", "data.val_max_tokens=4096", "--set", "ttt.batch_size=1", "--set", "ttt.eval_seq_len=128"]
    r = subprocess.run([sys.executable, "-m", "pgolf.cli", "eval", run, "--ttt", *ttt], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    execute("ttt_convergence.ipynb", tmp_path, run_dirs=[run], figures_dir=str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "ttt_convergence.png").is_file()


HEADLESS = {"train.ipynb": check_train, "architecture_tweaks.ipynb": check_architecture_tweaks,
            "bpb_vs_artifact.ipynb": check_bpb_vs_artifact,
            "gptq_precision_vs_bytes.ipynb": check_gptq_precision_vs_bytes,
            "ttt_convergence.ipynb": check_ttt_convergence}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "train.ipynb" else n
                                  for n in NOTEBOOKS])
def test_notebook_executes_headless(name, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    if name not in HEADLESS:
        pytest.fail(f"no headless parameters defined for {name}")
    HEADLESS[name](tmp_path, request, monkeypatch)


def last_text(nb):
    """What the notebook's last code cell printed."""
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


# notebook -> what it says with an empty runs/ (architecture_tweaks needs no runs: its check above runs without)
EMPTY = {"train.ipynb": "Run `make run` first", "bpb_vs_artifact.ipynb": "No finished run under",
         "gptq_precision_vs_bytes.ipynb": "No trained run under",
         "ttt_convergence.ipynb": "then `pgolf eval RUN --ttt`"}


@pytest.mark.parametrize("name", sorted(EMPTY))
def test_notebook_with_empty_runs_ends_with_what_to_run_first(name, tmp_path, monkeypatch):
    """A fresh clone: no runs and no data folder. The notebook runs to its end and says what to run first
    (papermill raises on any exception in a cell)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    nb = execute(name, tmp_path, runs_root="runs", figures_dir=str(tmp_path / "fig"))
    assert EMPTY[name] in last_text(nb)
    assert not (tmp_path / "fig").exists() and os.listdir(tmp_path / "runs") == []


# ---- the helpers the notebooks call

def test_widget_matches_headless_estimate():
    values = dict(attn_gate="attn_out", attn_gate_width=8, num_loops=1, loop_start=1, loop_end=2,
                  parallel_start_layer=2)
    headless = workbench.estimate(workbench.tweaked("cpu-smoke", ["model.num_layers=4"], **values))
    w = workbench.tweak_widget("cpu-smoke", ["model.num_layers=4"])
    assert workbench.set_widget_values(w, **values) == headless
    assert headless["params"] > workbench.estimate(get_preset("cpu-smoke"))["params"]  # the gate adds weights
    # the size estimate is within a few percent of a logged record (#1855: 15,865,260 B model blob)
    assert workbench.estimate(get_preset("pr1855"))["est_model_bytes"] == pytest.approx(15_865_260, rel=0.03)


def test_overrides_from_round_trip():
    cfg = workbench.tweaked("pr1855", ["train.seed=7"], attn_gate="dense", mlp_mult=3.0)
    sets = workbench.overrides_from(cfg)
    assert get_preset("pr1855", sets).to_dict() == cfg.to_dict()
    assert "model.attn_gate=\"dense\"" in sets and len(sets) == 3


def test_launch_command_and_failure(tmp_path):
    cmd = launch.torchrun_cmd(launch.train_args("cpu-smoke", "d", seed=3, overrides=["a.b=1"]), nproc=2)
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pgolf.train"]
    assert cmd[8:] == ["--preset", "cpu-smoke", "--data", "d", "--seed", "3", "--set", "a.b=1"]
    seen = []
    lines = launch.stream(["python3", "-c", "print('a'); print('{\"x\": 1}')"], echo=seen.append)
    assert seen == ["a", '{"x": 1}'] and launch.final_json(lines) == {"x": 1}
    with pytest.raises(PgolfError, match=r"^boom \[.* exited with status 3\]\nlast lines:\nboom$"):
        launch.stream(["python3", "-c", "import sys; print('boom'); sys.exit(3)"], echo=lambda s: None)
    assert launch.kernel_is_clean()
