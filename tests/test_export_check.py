"""`pgolf export` (record runs -> a submission folder) and `pgolf check` (the pre-submission checks).

Three seeds of a tiny cpu-smoke record make a valid folder; `pgolf check` passes on it and fails with
one clear line on each fault built into a copy of it: an artifact one byte over the cap, two seeds,
two seeds that are the same run, an evaluation of 601 s, a script that imports pgolf, and a trace in
which a token is trained on before it is scored.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from pgolf import distributed
from pgolf.config import Config
from pgolf.export import check, record
from pgolf.script import bundle, codebytes
from pgolf.presets import get_preset
from pgolf.significance import mean_std, welch

TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.val_batch_tokens=4096", "data.val_max_tokens=512", "ttt.eval_seq_len=64", "ttt.chunk_size=64",
        "train.iterations=4", "train.log_every=1"]
SEEDS = (1, 2, 3)


def tiny_cfg(data: Path, seed: int) -> Config:
    cfg = get_preset("cpu-smoke", TINY)
    cfg.data.path, cfg.train.seed, cfg.train.max_seconds = str(data), seed, 0.0
    return cfg


@pytest.fixture(scope="module")
def runs(sp1024_data, tmp_path_factory):
    """Three seeds through the record pipeline, in this process (as `python -m pgolf.export.record` runs it)."""
    root = tmp_path_factory.mktemp("runs")
    script = bundle.build(tiny_cfg(sp1024_data, SEEDS[0])).text  # one script for every seed
    ctx = distributed.setup()
    for s in SEEDS:
        record.run_record(tiny_cfg(sp1024_data, s), ctx, root / f"seed{s}", script)
    return [root / f"seed{s}" for s in SEEDS]


@pytest.fixture(scope="module")
def folder(runs, tmp_path_factory):
    from pgolf.export.submission import export

    out = tmp_path_factory.mktemp("records") / "2026-12-07_pgolf_tiny"
    res = export([str(r) for r in runs], out, name="pgolf tiny", author="A. Golfer", github_id="golfer")
    assert res["seeds"] == list(SEEDS) and res["legal"]
    return out


def test_export_writes_the_folder_the_records_have(folder, runs):
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "artifacts", "requirements.txt", "submission.json", "train_gpt.py",
                     "train_seed1.log", "train_seed2.log", "train_seed3.log"]
    assert (folder / "artifacts" / ".gitignore").read_text() == "*\n!.gitignore\n"
    assert (folder / "train_gpt.py").read_text() == (runs[0] / "train_gpt.py").read_text()
    sub = json.loads((folder / "submission.json").read_text())
    results = [json.loads((r / "result.json").read_text()) for r in runs]
    assert sub["author"] == "A. Golfer" and sub["github_id"] == "golfer" and sub["track"] == "10min_16mb"
    assert sub["seeds"] == list(SEEDS)
    assert sub["val_bpb"] == pytest.approx(np.mean([r["ttt_val_bpb"] for r in results]))
    for r in results:
        seed = sub["seed_results"][str(r["seed"])]
        art = folder / "artifacts" / f"seed{r['seed']}" / Path(r["artifact"]).name
        assert seed["bytes_model"] == art.stat().st_size and seed["bytes_code"] == r["code_bytes"]
        assert seed["bytes_total"] == seed["bytes_model"] + seed["bytes_code"] == r["total_bytes"]
    readme = (folder / "README.md").read_text()
    assert readme.count("\n| 1 |") + readme.count("\n| 2 |") + readme.count("\n| 3 |") == 3
    assert "`model.num_layers` | `2` | `4`" in readme  # the config as a diff against cpu-smoke
    assert "seed 1: ok" in readme and "train_seed1.log" in readme
    pinned = {re.sub(r"[-_.]+", "-", ln.split("==")[0]).lower() for ln in
              (folder / "requirements.txt").read_text().splitlines() if "==" in ln and not ln.startswith("#")}
    assert {"torch", "numpy", "sentencepiece", "python-minifier", "brotli"} <= pinned and "pgolf" not in pinned


def test_export_refuses_mixed_configurations_and_plain_runs(runs, tmp_path, cli):
    other = tmp_path / "other"  # seed 2's run, as if made with another LoRA rank
    shutil.copytree(runs[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["ttt"]["lora_rank"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli("export", str(runs[0]), str(other), "--out", tmp_path / "x")
    assert rc == 2 and "runs of different configurations" in err and str(other) in err
    plain = tmp_path / "plain"  # seed 3's run, as `pgolf train` records one (no record pipeline)
    shutil.copytree(runs[2], plain)
    res = json.loads((plain / "result.json").read_text())
    del res["pipeline"]
    (plain / "result.json").write_text(json.dumps(res))
    rc, _, err = cli("export", str(runs[0]), str(plain), "--out", tmp_path / "y")
    assert rc == 2 and "not a record run" in err and not (tmp_path / "y").exists()
    rc, _, err = cli("export", str(runs[0]), str(runs[0]), "--out", tmp_path / "z")
    assert rc == 2 and "both have seed 1" in err


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(seed="x"), "seed is 'x', expected an integer"),
    (lambda r: r.pop("ttt_val_bpb"), "no 'ttt_val_bpb' (not a complete record result)"),
    (lambda r: r.update(steps=2.5), "steps is 2.5, expected an integer"),
    (lambda r: r.update(eval_time={}), "eval_time.total_seconds is None, expected a number"),
], ids=["seed-a-string", "no-score", "steps-a-float", "no-eval-time"])
def test_export_names_a_result_field_it_cannot_write_from(runs, tmp_path, cli, edit, words):
    """A record run's result.json edited by hand or cut short: one error line naming the file and the
    field, and no folder (the README and submission.json are written from those fields)."""
    bad = tmp_path / "bad"
    shutil.copytree(runs[0], bad)
    res = json.loads((bad / "result.json").read_text())
    edit(res)
    (bad / "result.json").write_text(json.dumps(res))
    rc, _, err = cli("export", str(bad), str(runs[1]), "--out", tmp_path / "x")
    assert rc == 2 and err.strip().splitlines() == [f"pgolf: error: {bad / 'result.json'}: {words}"]
    assert not (tmp_path / "x").exists()


def test_check_passes_on_a_valid_export(folder, cli):
    rc, out, err = cli("check", folder)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert [ln.split(":")[0] for ln in lines] == ["PASS files", "PASS bytes", "PASS imports", "PASS network",
                                                   "PASS seeds", "PASS train_time", "PASS eval_time",
                                                   "PASS legality", "PASS claims"]
    assert out["ok"] and out["seeds"] == list(SEEDS)


def _claim_the_files(d: Path) -> None:
    """submission.json's figures made to agree with the (edited) files and seeds, so only the fault
    itself shows: each seed's bytes, and the mean, std and largest bytes over the seeds it lists."""
    measured = codebytes.measure((d / "train_gpt.py").read_text())
    code = measured["code_bytes"]
    sub = json.loads((d / "submission.json").read_text())
    for seed, res in sub["seed_results"].items():
        model = next((d / "artifacts" / f"seed{seed}").glob("*.ptz")).stat().st_size
        res.update(bytes_model=model, bytes_code=code, bytes_total=model + code, artifact_bytes=model + code)
    seeds = list(sub["seed_results"].values())
    for key in ("val_bpb", "val_loss"):
        sub[key], sub[f"{key}_std"] = mean_std([r[key] for r in seeds])
    total = [r["bytes_total"] for r in seeds]
    sub.update(bytes_total=max(total), artifact_bytes_max=max(total), artifact_bytes_mean=round(np.mean(total)),
               bytes_code=code, bytes_code_raw=measured["code_bytes_raw"])
    (d / "submission.json").write_text(json.dumps(sub))


def _over_cap(d: Path) -> None:
    code = codebytes.measure((d / "train_gpt.py").read_text())["code_bytes"]
    art = next((d / "artifacts" / "seed2").glob("*.ptz"))
    art.write_bytes(art.read_bytes() + b"\0" * (16_000_001 - code - art.stat().st_size))
    _claim_the_files(d)


def _two_seeds(d: Path) -> None:
    (d / "train_seed3.log").unlink()
    shutil.rmtree(d / "artifacts" / "seed3")
    sub = json.loads((d / "submission.json").read_text())
    del sub["seed_results"]["3"]
    (d / "submission.json").write_text(json.dumps(sub))
    _claim_the_files(d)


def _same_run(d: Path) -> None:
    """Seed 3's files replaced by seed 1's, the seed line changed: one run passed off as two."""
    log = (d / "train_seed1.log").read_text().replace("  train.seed: 1\n", "  train.seed: 3\n")
    (d / "train_seed3.log").write_text(log)
    for p in (d / "artifacts" / "seed1").iterdir():
        shutil.copyfile(p, d / "artifacts" / "seed3" / p.name)
    sub = json.loads((d / "submission.json").read_text())
    sub["seed_results"]["3"] = sub["seed_results"]["1"]
    (d / "submission.json").write_text(json.dumps(sub))
    _claim_the_files(d)


def _slow_eval(d: Path) -> None:
    log = d / "train_seed2.log"
    log.write_text(re.sub(r"total_eval_time:[\d.]+s", "total_eval_time:601.0s", log.read_text()))


def _imports_pgolf(d: Path) -> None:
    script = d / "train_gpt.py"
    script.write_text(script.read_text().replace("from __future__ import annotations\n",
                                                 "from __future__ import annotations\nimport pgolf\n", 1))
    _claim_the_files(d)


def _update_before_score(d: Path) -> None:
    path = d / "artifacts" / "seed1" / "trace.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["update_at"].size > 0
    arrays["update_max_order"][0] = arrays["update_at"][0]  # trained on the token scored right after it
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("fault, condition, words", [
    (_over_cap, "bytes", "16,000,001"),
    (_two_seeds, "seeds", "2 distinct seed(s)"),
    (_same_run, "seeds", "are the same run"),
    (_slow_eval, "eval_time", "evaluation 601.0 s > 600"),
    (_imports_pgolf, "imports", "imports pgolf"),
    (_update_before_score, "legality", "score before update"),
])
def test_check_fails_with_one_clear_line(folder, tmp_path, capsys, fault, condition, words):
    """...and the JSON result is still the last stdout line: a check that finds a failure is a result
    (it used to print nothing on stdout)."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    fault(bad)
    rc, out, err = run_check(capsys, bad)
    assert rc == 2
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL")]
    mine = [ln for ln in fails if ln.startswith(f"FAIL {condition}:")]
    assert len(mine) == 1 and words in mine[0], err
    assert fails == mine, err
    assert err.strip().splitlines()[-1].startswith("pgolf: error:")
    assert out is not None and out["ok"] is False and out["folder"] == str(bad)
    assert [k for k, c in out["checks"].items() if not c["ok"]] == [condition]
    assert words in out["checks"][condition]["detail"] and out["checks"]["files"]["ok"] is True


def run_check(capsys, *args) -> tuple[int, dict | None, str]:
    """`pgolf check ARGS` in-process: (exit status, the last stdout line as JSON whatever the status, stderr)."""
    from pgolf.cli import main

    capsys.readouterr()
    rc = main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, json.loads(lines[-1]) if lines else None, err


def _edit_claim(key, value):
    def edit(d: Path) -> None:
        sub = json.loads((d / "submission.json").read_text())
        sub["seed_results"]["1"][key] = value
        (d / "submission.json").write_text(json.dumps(sub))
    return edit


@pytest.mark.parametrize("fault, words", [
    (lambda d: (d / "submission.json").write_text("[]"), "submission.json has no seed_results object"),
    (lambda d: (d / "submission.json").write_text('{"seed_results": []}'), "has no seed_results object"),
    (lambda d: (d / "submission.json").write_bytes(b"\xff\xfe"), "submission.json unreadable (UnicodeDecodeError)"),
    (lambda d: (d / "submission.json").write_text('{"seed_results": {"1": 5, "2": {}, "3": {}}}'),
     "seed 1: its seed_results entry is a JSON int, not an object"),
    (_edit_claim("val_bpb", "abc"), "seed 1: val_bpb 'abc' claimed"),
    (_edit_claim("bytes_total", None), "seed 1: None bytes claimed"),
], ids=["a-list", "results-a-list", "not-utf8", "entry-a-number", "bpb-a-string", "bytes-null"])
def test_a_malformed_submission_json_is_one_failed_claims_line(folder, tmp_path, cli, fault, words):
    """The claims are read defensively: whatever shape submission.json has, `claims` fails with its
    reason and the other conditions still run (no traceback)."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    fault(bad)
    rc, _, err = cli("check", bad)
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL")]
    assert rc == 2 and len(fails) == 1 and fails[0].startswith("FAIL claims:") and words in fails[0], err


def test_odd_files_in_the_folder_are_named_not_tracebacks(folder, tmp_path, cli):
    """A folder named like an artifact is not one; a script that is not UTF-8 text is one error line."""
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    (odd / "artifacts" / "seed1" / "extra.ptz").mkdir()
    rc, _, err = cli("check", odd)
    assert rc == 0, err
    (odd / "train_gpt.py").write_bytes(b"\xff\xfe")
    rc, _, err = cli("check", odd)
    assert rc == 2 and err.strip().splitlines()[-1] == f"pgolf: error: {odd / 'train_gpt.py'}: not UTF-8 text"


def test_no_seed_condition_passes_on_a_folder_without_logs(folder, tmp_path, cli):
    """A folder with its files but no seed logs and artifacts: every per-seed condition fails (none
    passes because there was nothing to look at)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train_gpt.py", "submission.json", "README.md", "requirements.txt"):
        shutil.copyfile(folder / name, bare / name)
    rc, _, err = cli("check", bare)
    assert rc == 2
    lines = {ln.split(":")[0][5:]: ln for ln in err.splitlines() if ln.startswith(("PASS", "FAIL"))}
    assert [n for n, ln in lines.items() if ln.startswith("PASS")] == ["imports", "network"]
    for name in ("bytes", "train_time", "eval_time", "legality", "claims"):
        assert "no seed logs to check" in lines[name], err


def test_significance_is_the_stats_rule(folder, runs, tmp_path, cli):
    results = [json.loads((r / "result.json").read_text()) for r in runs]
    bpb, loss = [r["ttt_val_bpb"] for r in results], [r["ttt_val_loss"] for r in results]
    ratio = np.mean([lo / b for lo, b in zip(loss, bpb)])
    rc, out, err = cli("check", folder, "--vs", f"{np.mean(bpb) + 1.0},0.001,3")  # a far worse record
    assert rc == 0, err
    assert "PASS significance" in err
    rc, _, err = cli("check", folder, "--vs", f"{np.mean(bpb) + 0.002},0.001,3")  # 0.004 nats: not enough
    assert rc == 2 and "FAIL significance" in err
    # against a record folder: the same one-sided Welch test `pgolf stats` runs on per-seed losses
    ref = tmp_path / "ref"
    ref.mkdir()
    for s, lo in zip(SEEDS, loss):
        (ref / f"train_seed{s}.log").write_text(f"quantized_ttt_lora val_loss:{lo + 0.01:.8f} val_bpb:1.0\n")
    rc, _, err = cli("check", folder, "--vs", ref)
    line = next(ln for ln in err.splitlines() if "significance" in ln)
    logged = [float(f"{x:.8f}") for x in loss]
    expect = welch([x + 0.01 for x in logged], logged)["p_value"]
    assert f"p = {expect:.4g}" in line and ratio > 0


def test_reference_folder_skips_a_log_not_named_by_its_seed(tmp_path):
    """A stray train_seed_old.log (no seed line, no seed in its name) in a record folder given to --vs
    is not one of its seeds: it used to end `pgolf check` with an AttributeError."""
    for s, lo in ((1, 2.50), (2, 2.52)):
        (tmp_path / f"train_seed{s}.log").write_text(f"quantized_ttt val_loss:{lo} val_bpb:1.0\n")
    (tmp_path / "train_seed_old.log").write_text("quantized_ttt val_loss:9.0 val_bpb:3.0\n")
    mean, std, n, label = check.reference(check.parse_vs(str(tmp_path)), 1.0)
    assert (n, label) == (2, f"{tmp_path.name} (2 seeds)")
    assert mean == pytest.approx(2.51) and std == pytest.approx(math.sqrt(0.0002))  # ddof=1: 2 * 0.01^2 / 1


@pytest.mark.parametrize("vs", ["a,b,c", "1,2", "inf,0.001,3", "nan,0.001,3", "1.07,-0.001,3", "1.07,nan,3",
                                "1.07,0.001,1", "1.07,0.001,2.5", "0,0.001,3"])
def test_a_bad_vs_is_one_error_line_before_any_check(vs, tmp_path, cli):
    """`--vs inf,0.001,3` passed the significance check (p = 0) and `--vs a,b,c` was hidden behind the
    other failures: a reference that is not a folder or a finite mean > 0, std >= 0 and whole N >= 2 is
    refused before any check runs."""
    rc, _, err = cli("check", tmp_path, "--vs", vs)
    assert rc == 2 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith(f"pgolf: error: --vs {vs!r}: expected"), err
    assert check.parse_vs("1.07,0.001,3.0") == (1.07, 0.001, 3) and check.parse_vs(str(tmp_path)) == tmp_path


def _set_claim(key, value, seed=None):
    """Edit one figure of submission.json: top level (seed None) or one seed's; `value` maps the old one."""
    def edit(d: Path) -> None:
        sub = json.loads((d / "submission.json").read_text())
        where = sub if seed is None else sub["seed_results"][seed]
        where[key] = value(where[key])
        (d / "submission.json").write_text(json.dumps(sub))
    return edit


@pytest.mark.parametrize("fault, field", [
    (_set_claim("val_bpb", lambda v: 1.0), "val_bpb"),
    (_set_claim("val_loss", lambda v: v - 0.001), "val_loss"),
    (_set_claim("val_bpb_std", lambda v: v / 2), "val_bpb_std"),
    (_set_claim("val_loss_std", lambda v: None), "val_loss_std"),
    (_set_claim("bytes_total", lambda v: v - 1), "bytes_total"),
    (_set_claim("artifact_bytes_max", lambda v: v - 1), "artifact_bytes_max"),
    (_set_claim("artifact_bytes_mean", lambda v: v - 2), "artifact_bytes_mean"),
    (_set_claim("bytes_code", lambda v: v - 1), "bytes_code"),
    (_set_claim("bytes_code_raw", lambda v: v + 1), "bytes_code_raw"),
    (_set_claim("val_loss", lambda v: v + 0.001, seed="2"), "seed 2: val_loss"),
    (_set_claim("bytes_model", lambda v: v - 1, seed="2"), "seed 2: bytes_model"),
    (_set_claim("bytes_code", lambda v: v - 1, seed="2"), "seed 2: bytes_code"),
    (_set_claim("artifact_bytes", lambda v: v - 1, seed="2"), "seed 2: artifact_bytes"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_check_compares_every_claimed_figure(folder, tmp_path, cli, fault, field):
    """submission.json's top-level val_bpb edited to 1.0 passed `claims` (only the per-seed val_bpb and
    bytes_total were compared): every score and byte figure it carries is recomputed from the logs and
    files, and a wrong one is one FAIL line naming the field."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    fault(bad)
    rc, _, err = cli("check", bad)
    fails = [ln for ln in err.splitlines() if ln.startswith("FAIL")]
    assert rc == 2 and len(fails) == 1 and fails[0].startswith(f"FAIL claims: {field} "), err


def test_claims_hold_to_the_precision_they_are_written_with(folder, tmp_path, cli):
    """The records write a mean to a few decimals: 4 decimals agree with the logs' mean to 4 decimals,
    and one unit in the last place off does not."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sub = json.loads((bad / "submission.json").read_text())
    mean = sub["val_bpb"]
    for value, ok in ((round(mean, 4), True), (round(mean, 4) + 2e-4, False), (round(mean, 2), True)):
        (bad / "submission.json").write_text(json.dumps({**sub, "val_bpb": value}))
        rc, _, err = cli("check", bad)
        assert (rc == 0) == ok and ("FAIL claims: val_bpb" in err) != ok, (value, err)


def test_a_failed_check_still_prints_its_json(folder, capsys):
    """`--vs` against a record this folder does not beat by 0.005 nats: exit 2, and the JSON result (ok
    false, each condition's status) is the last stdout line, the `pgolf: error:` line last on stderr."""
    sub = json.loads((folder / "submission.json").read_text())
    rc, out, err = run_check(capsys, folder, "--vs", f"{sub['val_bpb'] + 0.002},0.0009,3")
    assert rc == 2 and out is not None and out["ok"] is False, err
    assert {k: c["ok"] for k, c in out["checks"].items()} == {
        "files": True, "bytes": True, "imports": True, "network": True, "seeds": True, "train_time": True,
        "eval_time": True, "legality": True, "claims": True, "significance": False}
    assert err.strip().splitlines()[-1].startswith(f"pgolf: error: {folder}: 1 of 10 checks failed")
    rc, out, err = run_check(capsys, folder, "--vs", "a,b,c")  # a usage error stays one line, no JSON
    assert rc == 2 and out is None and err.strip().splitlines() == ["pgolf: error: --vs 'a,b,c': expected "
                                                                     "BPB_MEAN,STD,N or a record folder"]


def test_export_checks_its_out_path_before_any_work(runs, tmp_path, cli):
    """`--out` naming a file, or a path under one, was a NotADirectoryError / FileExistsError traceback
    after the runs were read: it is one error line, before the runs are looked at (here one is bogus)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, why in ((a_file, "exists and is not a directory"),
                     (a_file / "x", f"{a_file} is a file, so nothing can be created under it")):
        rc, _, err = cli("export", runs[0], tmp_path / "no-such-run", "--out", out)
        assert rc == 2 and err.strip().splitlines() == [f"pgolf: error: --out {out}: {why}"], err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    rc, _, err = cli("export", runs[0], "--out", tmp_path / "full")
    assert rc == 2 and "exists and is not empty" in err and (tmp_path / "full" / "keep").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]  # nothing left behind


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_export_folder_mode_follows_the_umask(runs, tmp_path, umask):
    """The folder was drwx------ (tempfile.mkdtemp's mode, kept by the rename): a plain mkdir's mode
    now, as data and run folders have; an existing empty --out keeps its own."""
    from pgolf.export.submission import export

    before = os.umask(umask)
    try:
        export([str(r) for r in runs], tmp_path / "new")
        (tmp_path / "empty").mkdir(mode=0o700)
        export([str(r) for r in runs], tmp_path / "empty")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_requirements_pin_public_versions(monkeypatch):
    """requirements.txt pinned `torch==2.13.0+cpu` (or `+cu128` from a GPU run's env.json): a local
    version label that pip never finds on PyPI. Pins carry the public version only."""
    from pgolf.export import submission

    monkeypatch.setattr(submission, "distribution_of", lambda name: {"torch": "torch", "numpy": "numpy"}.get(name))
    monkeypatch.setattr(submission.importlib.metadata, "version", lambda dist: {"numpy": "2.1.0+local.7"}[dist])
    text = submission.requirements("import torch\nimport numpy\n", [{"versions": {"torch": "2.9.1+cu128"}}])
    pins = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert pins == ["numpy==2.1.0", "torch==2.9.1"]
