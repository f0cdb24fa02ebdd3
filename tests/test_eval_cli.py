"""Acceptance through the command line: a cpu-smoke model trained on the FineWeb sample (tests/fixtures), then
`pgolf eval RUN --ttt --trace` on its artifact (TTT beats the same weights without TTT; one trace entry per
validation target; the trace passes the audit), the int8 artifact, bad input, and the convergence
notebook run headless under papermill."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pgolf.eval.legality import audit_trace
from pgolf.eval.trace import load_trace

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: one thread each
VAL = ["--set", "data.val_max_tokens=4096"]
# the first 4096 validation tokens are one long document: one row, short context, to stay quick
TTT = [*VAL, "--set", "ttt.batch_size=1", "--set", "ttt.eval_seq_len=128"]


def pgolf(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "pgolf.cli", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=400)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    return r


@pytest.fixture(scope="module")
def run_dir(sp1024_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_cli") / "run"
    # a step count, not a wall clock: the same model however busy the machine is (TTT gains ~0.11 BPB on it)
    pgolf("train", "--preset", "cpu-smoke", "--data", sp1024_data, "--out", out, "--max-seconds", 0,
          "--set", "train.iterations=25", *VAL)
    return out


@pytest.fixture(scope="module")
def ttt_eval(run_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "trace.npz"
    r = pgolf("eval", run_dir, "--ttt", "--trace", trace, *TTT, ok=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), trace, r.stderr


def test_ttt_beats_no_ttt_with_one_trace_entry_per_token(run_dir, ttt_eval):
    out, trace, err = ttt_eval
    # progress on stderr while it runs (the CLI contract): load, the score without TTT, TTT rows, the end
    # without flags TTT adapts the trainer's artifact, as a submission is scored, and the JSON says so
    assert out["weights"] == "artifact" and out["artifact"] == str(run_dir / "final_model.int8.ptz")
    assert "eval: loaded final_model.int8.ptz" in err
    assert f"eval: val_bpb {out['val_bpb_no_ttt']:.4f} without TTT" in err
    assert "lora done phase" in err and f"running bpb {out['val_bpb']:.4f}" in err
    for key in ("val_bpb", "val_loss", "scored_tokens", "eval_seconds", "val_bpb_no_ttt", "time"):
        assert key in out, key
    print(f"\nBPB no TTT {out['val_bpb_no_ttt']:.4f} -> LoRA TTT {out['val_bpb']:.4f} "
          f"({out['updates']} updates, {out['eval_seconds']:.1f}s)")
    assert out["val_bpb"] < out["val_bpb_no_ttt"]
    t = load_trace(trace)
    assert len(t) == out["scored_tokens"] == out["val_targets"]  # exactly one entry per target
    assert np.array_equal(np.sort(t.position), np.arange(out["val_targets"]))
    assert audit_trace(t, out["val_targets"])["ok"]
    assert t.step[0] == 0 and t.step[-1] == len(t.update_at) == out["updates"]
    assert t.loss.astype(np.float64).sum() / np.log(2) / t.bytes.sum() == pytest.approx(out["val_bpb"], rel=1e-6)
    led = out["time"]
    assert led["timed"] == "ttt" and led["within_budget"] and {"load_seconds", "warmup_seconds",
                                                                "score_seconds", "ttt_seconds"} <= set(led)
    res = json.loads((run_dir / "result.json").read_text())
    assert res["ttt_val_bpb"] == out["val_bpb"] and res["ttt_val_bpb_no_ttt"] == out["val_bpb_no_ttt"]
    # the run's own artifact, adapted over every token its score had: the run's headline, as a record's
    assert res["val_bpb"] == out["val_bpb"] and res["val_loss"] == out["val_loss"]
    trained = [s for s in res["stages"] if s["by"] == "train" and s["weights"] == "fp"][-1]
    assert res["val_bpb_train"] == trained["val_bpb"]  # the trainer's score, kept for a later quantize
    rows = [json.loads(x) for x in (run_dir / "ttt.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "done" and rows[-1]["bpb"] == pytest.approx(out["val_bpb"], rel=1e-9)
    assert rows[-1]["bpb_no_ttt"] == pytest.approx(out["val_bpb_no_ttt"], rel=1e-6)


def test_eval_of_the_int8_artifact(run_dir):
    out = pgolf("eval", run_dir, "--artifact", run_dir / "final_model.int8.ptz", *VAL)
    res = json.loads((run_dir / "result.json").read_text())
    assert out["val_bpb"] == pytest.approx(res["artifact_val_bpb"], rel=1e-6)  # the trainer's own figure
    assert res["eval_val_bpb"] == out["val_bpb"] and out["time"]["timed"] == "score"


def test_moved_data_is_accepted_only_when_it_is_the_runs_own(run_dir, sp1024_data, tmp_path):
    """config.json keeps data.path as it was given; from elsewhere, or after the data moved, `--set
    data.path=` points eval (and quantize) at it: allowed when the validation shards there are byte for byte
    the ones env.json recorded, and the tokenizer too. Another validation set is refused."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(sp1024_data, moved)
    out = pgolf("eval", run_dir, "--artifact", run_dir / "final_model.int8.ptz", *VAL, "--set", f"data.path={moved}")
    res = json.loads((run_dir / "result.json").read_text())
    assert out["val_bpb"] == pytest.approx(res["artifact_val_bpb"], rel=1e-6)
    val = sorted(moved.glob("fineweb_val_0*.bin"))[-1]
    data = bytearray(val.read_bytes())
    data[-2:] = bytes([data[-1], data[-2]])  # two tokens swapped: another validation set
    val.write_bytes(bytes(data))
    r = pgolf("eval", run_dir, *VAL, "--set", f"data.path={moved}", ok=False)
    assert r.returncode == 2 and r.stderr.count("pgolf: error:") == 1
    assert f"{moved} does not hold the validation shards this run was scored on" in r.stderr
    r = pgolf("quantize", run_dir, "--no-eval", "--set", f"data.path={moved}", ok=False)
    assert r.returncode == 2 and "does not hold the validation shards" in r.stderr


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    from pgolf.cli import main

    for args, what in [(["--set", "model.num_layers=2"], "model.num_layers"),
                       (["--artifact", tmp_path / "nope.ptz"], "nope.ptz"),
                       (["--set", "ttt.method=magic", "--ttt"], "ttt.method"),
                       (["--set", "ttt.nope=1"], "ttt.nope")]:
        capsys.readouterr()
        assert main(["eval", str(run_dir), *VAL, *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert what in err and len(err.splitlines()) == 1, err


def test_convergence_notebook_headless(run_dir, ttt_eval, tmp_path):
    import papermill as pm

    figs = tmp_path / "figures"
    pm.execute_notebook(os.path.join(os.path.dirname(__file__), "..", "notebooks", "ttt_convergence.ipynb"),
                        str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
                        parameters={"run_dirs": [str(run_dir)], "figures_dir": str(figs)})
    assert (figs / "ttt_convergence.png").stat().st_size > 0 and (figs / "ttt_convergence.svg").stat().st_size > 0
