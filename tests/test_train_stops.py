"""How a training run ends: divergence is caught on the step it happens, SIGTERM ends train / quantize /
eval like Ctrl-C (exit 143, nothing recorded as finished), the result's train_loss is the last step's,
and the baseline logs on the official script's cadence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from process_helpers import sigterm_when

from pgolf.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256", "train.val_batch_tokens=4096", "data.val_max_tokens=4096",
        "train.export=\"none\""]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu"}


def sets(items):
    return [a for s in items for a in ("--set", s)]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_on_a_non_logging_step_fails_the_run_on_that_step(sp1024_data, tmp_path, cli, monkeypatch):
    """Logging every 10 steps, a NaN loss on step 3 of 5: today the run finishes; now it fails at step 3."""
    from pgolf import train as train_mod

    real, calls = train_mod.optimizer_step, []

    def nan_on_third(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_mod, "optimizer_step", nan_on_third)
    runs = tmp_path / "runs"
    rc, res, err = cli("train", "--preset", "cpu-smoke", "--data", sp1024_data, "--out", runs / "nan",
                       "--max-seconds", "0", *sets(TINY + ["train.iterations=5", "train.log_every=10"]))
    assert rc == 2 and res is None and len(calls) == 3  # stopped on the step itself, not 2 steps later
    assert [line for line in err.splitlines() if line.startswith("pgolf: error:")] == \
        ["pgolf: error: step 3: training loss is nan (diverged)"]
    result = json.loads((runs / "nan" / "result.json").read_text())
    assert result["status"] == "failed" and "step 3" in result["error"]
    assert [r["step"] for r in rows(runs / "nan")] == [1]  # no NaN row in metrics.jsonl
    assert not (runs / "index.jsonl").exists()


def test_train_loss_is_the_last_steps_and_the_official_cadence(sp1024_data, tmp_path, cli):
    """Validation at step 0 and every val_every steps, train logs every log_every steps and on the last
    step, so result.json's train_loss is the loss of the final step (today: the step-1 loss here)."""
    run = tmp_path / "r"
    rc, res, err = cli("train", "--preset", "cpu-smoke", "--data", sp1024_data, "--out", run, "--max-seconds", "0",
                       *sets(TINY + ["train.iterations=4", "train.log_every=3", "train.val_every=2"]))
    assert rc == 0, err
    m = rows(run)
    assert [r["step"] for r in m if "train_loss" in r] == [1, 3, 4]
    assert [r["step"] for r in m if "val_loss" in r] == [0, 2, 4]
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == 4 and result["train_loss"] == [r for r in m if "train_loss" in r][-1]["train_loss"]
    base = get_preset("baseline").train
    assert (base.val_every, base.log_every) == (1000, 200)  # the official VAL_LOSS_EVERY, TRAIN_LOG_EVERY
    assert get_preset("cpu-smoke").train.val_every == 0


def test_sigterm_interrupts_training(sp1024_data, tmp_path):
    """SIGTERM from outside (what torchrun, Slurm and launch.py send): exit 143, result.json says
    interrupted, nothing in the registry."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "pgolf.train", "--preset", "cpu-smoke", "--data", str(sp1024_data),
                             "--out", str(runs / "t"), "--max-seconds", "0",
                             *sets(TINY + ["train.iterations=100000", "train.log_every=1"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = runs / "t" / "metrics.jsonl"
    out, err = sigterm_when(proc, lambda: metrics.exists() and bool(metrics.read_text()))
    assert proc.returncode == 143, err[-2000:]
    assert "pgolf: terminated (SIGTERM)" in err and "Traceback" not in err and out.strip() == ""
    result = json.loads((runs / "t" / "result.json").read_text())
    assert result == {"status": "interrupted", "error": "Terminated: SIGTERM"}
    assert not (runs / "index.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_run(sp1024_data, tmp_path_factory):
    from pgolf.cli import main

    run = tmp_path_factory.mktemp("stops") / "run"
    assert main(["train", "--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(run), "--max-seconds", "0",
                 *sets(TINY + ["train.iterations=2"])]) == 0
    return run


# A SIGTERM that arrives in the middle of the work: the command's own process sends it to itself from
# inside a function the command calls, then that function goes on as usual.
SELF_TERM = """
import os, signal, sys
import {module} as target
real = target.{func}
def hooked(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
target.{func} = hooked
from pgolf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command,module,func", [("quantize", "pgolf.quant.pipeline", "load_val"),
                                                 ("eval", "pgolf.eval.score", "score_stream")])
def test_quantize_and_eval_exit_143_on_sigterm(command, module, func, tiny_run):
    before = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    argv = [command, str(tiny_run)] + (["--set", "quant.method=\"rtn\""] if command == "quantize"
                                       else ["--weights", "fp"])
    proc = subprocess.run([sys.executable, "-c", SELF_TERM.format(module=module, func=func), *argv],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "pgolf: terminated (SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr
    after = {p.name: p.read_bytes() for p in tiny_run.iterdir() if p.is_file()}
    assert after == before  # nothing half-written, the run's record untouched


def test_a_second_sigterm_during_cleanup_is_ignored():
    """The handler raises once; a repeat while the run records its status does not cut the cleanup short."""
    from pgolf.errors import Terminated, sigterm_raises

    done = []
    with pytest.raises(Terminated):
        with sigterm_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs here
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # ignored
                done.append("cleanup")
    assert done == ["cleanup"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
