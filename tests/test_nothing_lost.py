"""Nothing lost (issue 19): no command destroys or half-writes what exists before it has succeeded.

Each test hashes every file a command could touch, makes the command fail (bad input, `--strict` over
the limit, an interrupt, SIGTERM) and checks that every byte is still there; output paths and inputs
of the wrong shape fail in one `pgolf: error:` line before any work.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgolf.runs import RunDir, stages

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "data.val_max_tokens=4096", "train.iterations=2", "train.max_seconds=0"]
INT8 = ["--set", 'quant.method="int8"']


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, hidden ones (temporaries) included."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    """The error: one `pgolf: error:` line, the last on stderr (progress lines may come before it)."""
    lines = err.strip().splitlines()
    assert sum(x.startswith("pgolf: error:") for x in lines) == 1 and "Traceback" not in err, err
    assert lines[-1].startswith("pgolf: error:"), err
    return lines[-1]


@pytest.fixture(scope="module")
def trained(sp1024_data, tmp_path_factory):
    from pgolf.cli import main

    out = tmp_path_factory.mktemp("lost") / "run"
    assert main(["train", "--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(out),
                 *[a for s in TINY for a in ("--set", s)]]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the finished tiny run for each test."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(scope="module")
def measured_code_bytes(trained):
    from pgolf.config import Config
    from pgolf.script.codebytes import code_bytes

    return code_bytes(Config.load(Path(trained) / "config.json"))


@pytest.fixture
def code_bytes_once(monkeypatch, measured_code_bytes):
    """Counting the code (exporting and minifying the record script) takes ~3 s per configuration here:
    the run's real count, measured once per module, stands in for every quantisation setting."""
    monkeypatch.setattr("pgolf.script.codebytes.code_bytes", lambda *a, **k: measured_code_bytes)


@pytest.fixture
def docs(shared_dir, tmp_path) -> Path:
    """40 documents: a data folder is built from them in about a second."""
    src = (shared_dir / "data" / "docs_selected_sample200.jsonl").read_text().splitlines()[:40]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(src) + "\n")
    return path


def _build_args(docs: Path, out: Path, *extra: str) -> list:
    return ["data", "build", "--input", docs, "--val-docs", "5", "--out", out, *extra]


# ---- data build: the old folder stays until the new one is complete
@pytest.mark.parametrize("failure", ["untrainable tokenizer", "interrupt"])
def test_failed_rebuild_leaves_the_old_folder_byte_identical(cli, docs, shared_dir, tmp_path, monkeypatch, failure):
    from pgolf.data import shards

    out = tmp_path / "data"
    sp = shared_dir / "tokenizers" / "fineweb_1024_bpe.model"
    rc, _, err = cli(*_build_args(docs, out, "--tokenizer", sp, "--shard-tokens", "5000"))
    assert rc == 0, err
    before, siblings = snapshot(out), sorted(os.listdir(tmp_path))
    if failure == "untrainable tokenizer":
        rc, _, err = cli(*_build_args(docs, out, "--vocab-size", "60000"))
        assert rc == 2 and "Vocabulary size too high" in one_line(err)
    else:
        real, calls = shards.write_shard, []

        def interrupted(*a, **k):  # Ctrl-C while the third shard is written
            calls.append(a[0])
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*a, **k)
        monkeypatch.setattr(shards, "write_shard", interrupted)
        rc, _, err = cli(*_build_args(docs, out, "--tokenizer", sp, "--shard-tokens", "7000"))
        assert rc == 130 and len(calls) == 3
        monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == siblings  # no temporary folder left beside it
    # a build that succeeds replaces the folder as a whole (no shard of the old layout remains)
    rc, res, err = cli(*_build_args(docs, out, "--tokenizer", sp, "--shard-tokens", "50000"))
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_tokens"] == 50000
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(manifest["shards"])
    assert sorted(os.listdir(tmp_path)) == siblings


def test_build_keeps_a_folder_that_is_not_a_data_folder(cli, docs, shared_dir, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    rc, _, err = cli(*_build_args(docs, out, "--tokenizer",
                                  shared_dir / "tokenizers" / "fineweb_1024_bpe.model"))
    assert rc == 2 and "not a data folder" in one_line(err) and str(out) in err
    assert os.listdir(out) == ["mine.txt"]


# ---- output paths are checked before any work
@pytest.mark.parametrize("command", ["data build --out FILE", "data build --out FILE/sub", "data fetch --out FILE/sub",
                                     "train --out FILE"])
def test_output_paths_fail_before_any_work(cli, docs, sp1024_data, tmp_path, monkeypatch, command):
    from pgolf.data import build, fetch

    def no_work(*a, **k):
        raise AssertionError("work started before the output path was checked")
    monkeypatch.setattr(build, "read_documents", no_work)
    monkeypatch.setattr(fetch, "_download", no_work)
    monkeypatch.setattr(fetch, "_remote_info", no_work)
    monkeypatch.setattr("pgolf.train.Trainer", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "sub" if command.endswith("/sub") else blocker
    argv = {"data build": ["data", "build", "--input", docs, "--val-docs", "5", "--vocab-size", "256"],
            "data fetch": ["data", "fetch", "--train-shards", "1"],
            "train": ["train", "--preset", "cpu-smoke", "--data", sp1024_data]}[command.rsplit(" --out", 1)[0]]
    rc, _, err = cli(*argv, "--out", out)
    assert rc == 2 and str(out) in one_line(err)
    assert blocker.read_text() == "not a folder"


def test_fetch_offline_keeps_the_cause_and_leaves_no_folder(cli, tmp_path, monkeypatch):
    from pgolf.data import fetch

    def offline(repo_id, remote, staging):  # what huggingface_hub raises without a network
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as e:
            raise ValueError("Force download failed due to the above error.") from e
    monkeypatch.setattr(fetch, "_download", offline)
    monkeypatch.setattr(fetch, "_remote_info", lambda repo, paths: {})
    rc, _, err = cli("data", "fetch", "--train-shards", "1", "--out", tmp_path / "data")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("pgolf: error:")
    assert "Force download failed" in last and "Name or service not known" in last  # the cause, same line
    assert os.listdir(tmp_path) == []  # neither --out nor a partial folder


# ---- quantize publishes only after success
def test_sigterm_during_quantize_leaves_the_run_byte_identical(run):
    before = snapshot(run)
    # a sliding-window score of 32K tokens: about a second of scoring after the artifact is made
    cmd = [sys.executable, "-m", "pgolf.cli", "quantize", str(run), *INT8,
           "--set", "quant.eval_max_tokens=32768", "--set", "eval.stride=32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stderr:  # "... B model + ... B code": the artifact exists (in memory, or on disk)
        if "B model +" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    assert rc != 0, "quantize finished before the signal arrived (make its evaluation longer)"
    assert snapshot(run) == before


@pytest.mark.parametrize("phase", ["calibration", "quantisation", "artifact scoring"])
def test_interrupt_in_any_phase_leaves_the_run_byte_identical(run, cli, monkeypatch, code_bytes_once, phase):
    from pgolf.quant import hessian, pipeline
    from pgolf.quant import quantize as A

    module, name = {"calibration": (hessian, "calibrate"), "quantisation": (A, "quantize_state_dict"),
                    "artifact scoring": (pipeline, "load_artifact")}[phase]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, name, interrupted)
    before = snapshot(run)
    rc, _, err = cli("quantize", run, "--set", 'quant.method="gptq"', "--set", "quant.passthrough_numel=1024")
    assert rc == 130, err
    assert snapshot(run) == before  # no artifact, no result.json change, no train.log line, no hessians.pt


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt, however the suite was started: a shell starts a background job
    with SIGINT ignored, and ignoring it is then what signals_deferred rightly restores."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_while_publishing_waits_for_the_last_output(run, cli, monkeypatch, code_bytes_once,
                                                                  ctrl_c_interrupts):
    real = RunDir.update_result

    def interrupted(self, *a, **k):  # Ctrl-C between writing the artifact and updating result.json
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return real(self, *a, **k)
    monkeypatch.setattr(RunDir, "update_result", interrupted)
    rc, _, err = cli("quantize", run, *INT8, "--no-eval")
    assert rc == 130, err  # interrupted, but only after every output was in place
    result = RunDir(run).result()
    artifact = (run / "final_model.int8q.ptz").read_bytes()
    assert Path(result["artifact"]).name == "final_model.int8q.ptz"
    assert stages(result)[-1]["artifact_sha256"] == hashlib.sha256(artifact).hexdigest()
    assert "quantize: int8" in (run / "train.log").read_text()


def test_strict_over_the_limit_leaves_the_run_byte_identical(run, cli, code_bytes_once):
    before = snapshot(run)
    rc, _, err = cli("quantize", run, "--strict", *INT8, "--set", "quant.limit_bytes=1000")
    assert rc == 2 and "over the 1,000-byte limit" in one_line(err)
    assert snapshot(run) == before


def test_requantisation_keeps_the_trainers_export_and_adds_stages(run, cli, code_bytes_once):
    export = (run / "final_model.int8.ptz").read_bytes()
    trained = RunDir(run).result()
    rc, res, err = cli("quantize", run, *INT8)
    assert rc == 0, err
    assert Path(res["artifact"]).name == "final_model.int8q.ptz"
    assert (run / "final_model.int8.ptz").read_bytes() == export  # the trainer's artifact untouched
    after = RunDir(run).result()
    got = stages(after)
    assert [(s["by"], s["name"], s["artifact"]) for s in got] == [
        ("train", "pre-quant", "final_model.pt"), ("train", "quantised", "final_model.int8.ptz"),
        ("quantize", "pre-quant", "final_model.pt"), ("quantize", "quantised", "final_model.int8q.ptz")]
    assert [s["val_bpb"] for s in got[:2]] == [s["val_bpb"] for s in trained["stages"]]  # the trainer's numbers
    assert got[1]["artifact_sha256"] == hashlib.sha256(export).hexdigest()
    q = got[3]
    assert q["weights"] == "artifact" and q["method"] == "int8" and q["tokens"] == 4096
    assert q["total_bytes"] == res["total_bytes"]
    assert q["artifact_sha256"] == hashlib.sha256((run / "final_model.int8q.ptz").read_bytes()).hexdigest()
    assert after["quant_val_tokens"] == 4096 and after["stages_comparable"] is True
    # `pgolf eval` without flags now scores the quantised artifact, and says so
    rc, ev, err = cli("eval", run)
    assert rc == 0 and Path(ev["artifact"]).name == "final_model.int8q.ptz" and ev["weights"] == "artifact", err
    assert ev["val_bpb"] == pytest.approx(res["val_bpb"], abs=1e-9)


def test_an_unscored_requantisation_clears_the_replaced_artifacts_scores(run, cli, code_bytes_once):
    """`quantize --no-eval` after a scored quantisation: the int8q artifact's scores must not stay in the
    flat keys beside the rtn artifact's bytes (nor reach `pgolf stats` through the stages)."""
    trained = RunDir(run).result()
    rc, q8, err = cli("quantize", run, *INT8)
    assert rc == 0, err
    rc, ev, err = cli("eval", run)  # eval_* now score final_model.int8q.ptz
    assert rc == 0, err
    rc, rtn, err = cli("quantize", run, "--no-eval", "--set", 'quant.method="rtn"')
    assert rc == 0, err
    after = RunDir(run).result()
    assert Path(after["artifact"]).name == "final_model.rtn.ptz" and after["total_bytes"] == rtn["total_bytes"]
    assert after["quant_method"] == "rtn"
    for key in ("quant_val_bpb", "quant_val_tokens", "quant_delta_bpb", "artifact_val_bpb", "artifact_val_loss",
                "eval_val_bpb", "eval_val_loss", "eval_artifact"):
        assert after[key] is None, key
    # final_model.pt did not change: its scores still hold
    assert (after["val_bpb"], after["val_loss"]) == (trained["val_bpb"], trained["val_loss"])
    assert after["val_bpb_prequant"] == q8["val_bpb_prequant"]
    last = stages(after)[-1]  # nothing lost: the cleared values, under the artifact they scored
    assert last["artifact"] == "final_model.rtn.ptz" and last["val_bpb"] is None
    assert last["replaced"]["artifact"] == "final_model.int8q.ptz"
    assert last["replaced"]["scores"]["quant_val_bpb"] == q8["val_bpb"]
    assert last["replaced"]["scores"]["eval_val_bpb"] == ev["val_bpb"]
    rc, _, err = cli("stats", run, "--metric", "quant_val_bpb")  # no score of the rtn artifact yet
    assert rc == 2 and "no finished run with 'quant_val_bpb'" in one_line(err)
    rc, st, err = cli("stats", run)
    assert rc == 0 and st["a"]["mean"] == trained["val_bpb"], err


def test_unfinished_runs_and_model_overrides_are_refused(run, cli, code_bytes_once):
    result = json.loads((run / "result.json").read_text())
    (run / "result.json").write_text(json.dumps({**result, "status": "interrupted"}))
    before = snapshot(run)
    for argv in (["quantize", run, "--no-eval"], ["eval", run]):
        rc, _, err = cli(*argv)
        line = one_line(err)
        assert rc == 2 and "interrupted" in line and "--allow-unfinished" in line
    assert snapshot(run) == before
    rc, res, err = cli("quantize", run, "--no-eval", "--allow-unfinished", "--set", 'quant.method="rtn"')
    assert rc == 0 and Path(res["artifact"]).name == "final_model.rtn.ptz", err
    rc, ev, err = cli("eval", run, "--allow-unfinished", "--weights", "fp")
    assert rc == 0 and Path(ev["artifact"]).name == "final_model.pt" and ev["weights"] == "fp", err
    for argv in (["quantize", run, "--allow-unfinished"], ["eval", run, "--allow-unfinished"]):
        rc, _, err = cli(*argv, "--set", "model.num_layers=1")
        assert rc == 2 and "model.num_layers" in one_line(err)


def test_eval_without_an_artifact_suggests_a_command_that_works(run, cli, code_bytes_once):
    result = json.loads((run / "result.json").read_text())
    result = {k: v for k, v in result.items() if k != "artifact"}  # as a run that exported none
    (run / "result.json").write_text(json.dumps({**result, "status": "interrupted"}))
    rc, _, err = cli("eval", run, "--allow-unfinished")
    line = one_line(err)
    assert rc == 2 and f"run `pgolf quantize {run} --allow-unfinished`" in line
    suggested = line.split("run `pgolf ")[1].split("`")[0].split()
    rc, _, err = cli(*suggested, "--no-eval")
    assert rc == 0, err


# ---- eval: --trace checked first; TTT scores the artifact, and a shorter TTT score is flagged
def test_trace_to_an_unwritable_place_fails_before_scoring(run, cli, tmp_path, monkeypatch):
    import pgolf.eval.score as S

    calls = []
    real = S.score_stream
    monkeypatch.setattr(S, "score_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    sliding = ["--set", "eval.stride=16"]
    t0 = time.perf_counter()
    rc, res, err = cli("eval", run, *sliding, "--trace", tmp_path / "ok.npz")
    t_eval = time.perf_counter() - t0
    assert rc == 0 and len(calls) == 1 and res["trace_entries"] == 4096, err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t0 = time.perf_counter()
    rc, _, err = cli("eval", run, *sliding, "--trace", blocker / "trace.npz")
    t_fail = time.perf_counter() - t0
    print(f"\n--trace refused after {t_fail:.3f} s; the evaluation takes {t_eval:.3f} s")
    assert rc == 2 and str(blocker) in one_line(err)
    assert len(calls) == 1 and t_fail < t_eval  # nothing was scored


def test_ttt_scores_the_artifact_and_a_shorter_ttt_score_is_flagged(run, cli):
    before = RunDir(run).result()
    rc, res, err = cli("eval", run, "--ttt", "--set", "data.val_max_tokens=2048", "--set", "ttt.batch_size=1",
                       "--set", "ttt.eval_seq_len=64")
    assert rc == 0, err
    assert res["weights"] == "artifact" and Path(res["artifact"]).name == "final_model.int8.ptz"
    result = RunDir(run).result()
    ttt = [s for s in stages(result) if s["name"] == "ttt"]
    assert len(ttt) == 1 and ttt[0]["tokens"] == 2048 and ttt[0]["fewer_tokens"] is True
    assert ttt[0]["weights"] == "artifact" and ttt[0]["artifact"] == "final_model.int8.ptz"
    assert result["stages_comparable"] is False and result["ttt_val_tokens"] == 2048
    assert [s["fewer_tokens"] for s in stages(result) if s["by"] == "train"] == [False, False]
    # a TTT score on fewer tokens never becomes the run's headline
    assert (result["val_bpb"], result["val_loss"]) == (before["val_bpb"], before["val_loss"])


# ---- inputs of the wrong shape: one line naming the file, exit 2
def _list_artifact(path: Path) -> Path:
    from pgolf.artifact.codecs import compress

    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    path.write_bytes(compress(buf.getvalue(), "zlib", 9))
    return path


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


@pytest.mark.parametrize("case", ["artifact holds a list", "weights are random bytes", "val_bpb is a string",
                                  "result.json is a list", "manifest is a list", "manifest vocab_size is a string"])
def test_malformed_input_is_one_line(run, cli, tmp_path, sp1024_data, case):
    if case == "artifact holds a list":
        bad = _list_artifact(tmp_path / "list.ptz")
        checks = [(["eval", run, "--artifact", bad], [str(bad), "list"])]
    elif case == "weights are random bytes":
        (run / "final_model.pt").write_bytes(os.urandom(4096))
        checks = [(["quantize", run, "--no-eval"], ["final_model.pt"]),
                  (["eval", run, "--weights", "fp"], ["final_model.pt"])]
    elif case in ("val_bpb is a string", "result.json is a list"):
        _edit_json(run / "result.json", lambda r: {**r, "val_bpb": "4.3"} if case.startswith("val_bpb") else [r])
        want = ["result.json", "val_bpb" if case.startswith("val_bpb") else "list"]
        checks = [(["quantize", run], want), (["eval", run], want)]
    else:
        data = Path(shutil.copytree(sp1024_data, tmp_path / "data"))
        _edit_json(data / "manifest.json",
                   lambda m: [m] if case == "manifest is a list" else {**m, "vocab_size": "1024"})
        _edit_json(run / "config.json", lambda c: {**c, "data": {**c["data"], "path": str(data)}})
        checks = [(["eval", run], ["manifest.json"]), (["data", "audit", "--data", data], ["manifest.json"])]
    for argv, words in checks:
        rc, _, err = cli(*argv)
        line = one_line(err)
        assert rc == 2 and all(w in line for w in words), (argv, line)
