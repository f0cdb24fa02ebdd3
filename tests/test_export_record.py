"""The record pipeline and its exported script.

- a record run (`python -m pgolf.export.record`) scores exactly what `pgolf train` + `pgolf quantize` +
  `pgolf eval --ttt` score on the same configuration, with the same artifact and code bytes;
- the exported train_gpt.py, in a fresh virtual environment with the packages but without pgolf,
  run from another folder, reproduces the record run to the last digit and writes the same artifact;
- under torchrun --nproc_per_node=2 (gloo) it gives the one-process loss curve at the same global batch.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from pgolf.errors import PgolfError
from pgolf.export import record
from pgolf.presets import get_preset

# cpu-smoke made tiny for speed; micro_batch_tokens=256 makes one process accumulate the two
# micro-batches that two ranks take (the same global batch, the same data).
TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
        "train.micro_batch_tokens=256", "train.val_batch_tokens=4096", "data.val_max_tokens=1024",
        "ttt.eval_seq_len=64", "ttt.chunk_size=64", "train.log_every=1", "train.iterations=6"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


def curve(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"^\d+/\d+ train_loss: ([\d.]+)", log, re.M)]


@pytest.fixture(scope="module")
def record_run(sp1024_data, tmp_path_factory):
    """(the run folder, its result.json, the JSON line it printed last)."""
    out = tmp_path_factory.mktemp("record") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        rc = record.cli(["--preset", "cpu-smoke", "--data", str(sp1024_data), "--max-seconds", "0", "--out",
                         str(out), *sets(TINY)])
    assert rc == 0
    return out, json.loads((out / "result.json").read_text()), json.loads(stdout.getvalue().splitlines()[-1])


def test_record_run_is_train_quantize_eval(record_run, sp1024_data, tmp_path, cli):
    out, res, _ = record_run
    assert res["status"] == "finished" and res["pipeline"] == "record" and res["steps"] == 6
    assert (out.parent / "index.jsonl").read_text().count(str(out)) == 1  # in the registry
    log = (out / "train.log").read_text()
    assert len(curve(log)) == 6 and "total_eval_time:" in log and re.search(r"train_time: \d+ms step: 6/6", log)
    run = tmp_path / "plain"
    rc, trained, err = cli("train", "--preset", "cpu-smoke", "--data", sp1024_data, "--max-seconds", "0",
                           "--out", run, *sets(TINY))
    assert rc == 0, err
    rc, quant, err = cli("quantize", run)
    assert rc == 0, err
    rc, ev, err = cli("eval", run, "--artifact", quant["artifact"], "--ttt")
    assert rc == 0, err
    assert res["val_bpb_prequant"] == trained["val_bpb"]
    assert res["quant_val_bpb"] == quant["val_bpb"] == ev["val_bpb_no_ttt"]
    assert res["ttt_val_bpb"] == ev["val_bpb"] and res["ttt_updates"] == ev["updates"]
    assert Path(quant["artifact"]).read_bytes() == Path(res["artifact"]).read_bytes()
    assert quant["code_bytes"] == res["code_bytes"]  # pgolf quantize counts the exported script
    # each score is a stage with (at least) the keys the three commands give theirs
    plain = json.loads((run / "result.json").read_text())["stages"]
    mine = {s["name"]: s for s in res["stages"]}
    for name in ("pre-quant", "quantised", "ttt"):
        theirs = [s for s in plain if s["name"] == name][-1]
        assert set(theirs) <= set(mine[name]) and mine[name]["by"] == "record", name
        assert (mine[name]["val_bpb"], mine[name]["tokens"]) == (theirs["val_bpb"], theirs["tokens"]), name


def test_record_result_headline_is_what_it_prints_exports_and_stats_reads(record_run, tmp_path, cli):
    """A record run's result.json said val_bpb = the quantised score without TTT and had no stages, while
    its JSON line and `pgolf export` gave the TTT score: `pgolf stats` on the seeds reported another mean."""
    out, res, last = record_run
    assert [s["name"] for s in res["stages"]] == ["pre-quant", "quantised", "ttt"] and res["stages_comparable"]
    assert [s["val_bpb"] for s in res["stages"]] == [res["val_bpb_prequant"], res["quant_val_bpb"], res["ttt_val_bpb"]]
    assert res["stages"][2]["val_loss"] == res["ttt_val_loss"] and res["stages"][2]["updates"] == res["ttt_updates"]
    assert res["val_bpb"] == last["val_bpb"] == res["ttt_val_bpb"] and res["val_loss"] == last["val_loss"]
    rc, exported, err = cli("export", out, "--out", tmp_path / "rec")
    assert rc == 0, err
    seed = json.loads((tmp_path / "rec" / "submission.json").read_text())["seed_results"][str(res["seed"])]
    assert exported["val_bpb"] == seed["val_bpb"] == res["val_bpb"]
    rc, stats, err = cli("stats", str(out))
    assert rc == 0, err
    assert stats["a"]["mean"] == res["val_bpb"] and stats["a"]["loss_mean"] == res["ttt_val_loss"]


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory):
    """A virtual environment with this environment's packages on its path but not pgolf (a .pth line
    adds the site-packages folder without running its .pth files, so the editable pgolf is absent)."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def fresh_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", "PGOLF_DEVICE": "cpu", **extra}


def test_exported_script_stands_alone_and_reproduces_the_run(record_run, fresh_python, sp1024_data, tmp_path):
    out, res, _ = record_run
    (tmp_path / "train_gpt.py").write_text((out / "train_gpt.py").read_text())
    no_pgolf = subprocess.run([str(fresh_python), "-c", "import pgolf"], cwd=tmp_path, env=fresh_env(),
                              capture_output=True, text=True)
    assert no_pgolf.returncode != 0 and "No module named 'pgolf'" in no_pgolf.stderr
    env = fresh_env(DATA_PATH=str(sp1024_data), SEED=str(res["seed"]), RUN_ID="again", ITERATIONS="6",
                    MAX_WALLCLOCK_SECONDS="0")
    r = subprocess.run([str(fresh_python), "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    again = json.loads((tmp_path / "runs" / "again" / "result.json").read_text())
    assert last["val_bpb"] == pytest.approx(res["ttt_val_bpb"], abs=1e-6) and again["val_bpb"] == last["val_bpb"]
    for key in ("val_bpb_prequant", "quant_val_bpb", "ttt_val_bpb", "ttt_val_loss", "code_bytes", "model_bytes"):
        assert again[key] == pytest.approx(res[key], abs=1e-6), key
    assert (tmp_path / "runs" / "again" / Path(res["artifact"]).name).read_bytes() == Path(res["artifact"]).read_bytes()
    assert last["bytes_total"] == res["total_bytes"] and last["bytes_code"] == res["code_bytes"]
    # a bad override is one clear line and exit status 2
    bad = subprocess.run([str(fresh_python), "train_gpt.py"], cwd=tmp_path, env={**env, "ITERATIONS": "many"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "train_gpt.py: error: ITERATIONS='many': expected int >= 1 (train.iterations)"
    for var, value, line in [
        ("ITERATIONS", "-1", "ITERATIONS='-1': expected int >= 1 (train.iterations)"),
        ("MAX_WALLCLOCK_SECONDS", "nan", "MAX_WALLCLOCK_SECONDS='nan': expected float >= 0 (train.max_seconds)"),
        ("RUN_ID", "../escape", "RUN_ID='../escape': expected a folder name, not a path"),
    ]:  # out of the field's domain, or a path where a name goes: refused before any work
        bad = subprocess.run([str(fresh_python), "train_gpt.py"], cwd=tmp_path, env={**env, var: value},
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == f"train_gpt.py: error: {line}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "train_gpt.py"]


def test_exported_script_under_torchrun_gives_the_one_process_curve(record_run, fresh_python, sp1024_data, tmp_path):
    out, res, _ = record_run
    (tmp_path / "train_gpt.py").write_text((out / "train_gpt.py").read_text())
    env = fresh_env(DATA_PATH=str(sp1024_data), SEED=str(res["seed"]), RUN_ID="two", ITERATIONS="6",
                    MAX_WALLCLOCK_SECONDS="0")
    r = subprocess.run([str(fresh_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 prints the one JSON line
    two = json.loads((tmp_path / "runs" / "two" / "result.json").read_text())
    assert two["world_size"] == 2
    one_curve = curve((out / "train.log").read_text())
    two_curve = curve((tmp_path / "runs" / "two" / "train.log").read_text())
    assert len(two_curve) == len(one_curve) == 6 and len(set(one_curve)) > 1
    assert two_curve == pytest.approx(one_curve, abs=2e-4)  # 4 decimals in the log
    assert two["val_bpb_prequant"] == pytest.approx(res["val_bpb_prequant"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "runs" / "two").glob("trace*.npz")) == \
        ["trace.rank0.npz", "trace.rank1.npz"]


def test_environment_overrides_are_typed_and_in_their_fields_domain():
    """ENV's least values are the fields' domains in pgolf.config_domains (the script carries only these)."""
    from pgolf.config_domains import DOMAINS

    for var, (section, key, least) in record.ENV.items():
        domain = DOMAINS.get(f"{section}.{key}")
        assert least == (domain.lo if domain else None), var
    cfg = get_preset("cpu-smoke")
    assert record.apply_env(cfg, {"ITERATIONS": "7", "MAX_WALLCLOCK_SECONDS": "0", "SEED": "3"}).train.iterations == 7
    assert (cfg.train.max_seconds, cfg.train.seed) == (0.0, 3)
    for env, words in [({"ITERATIONS": "0"}, "expected int >= 1"), ({"MAX_WALLCLOCK_SECONDS": "-1"}, ">= 0"),
                       ({"MAX_WALLCLOCK_SECONDS": "inf"}, "expected float >= 0"),
                       ({"SEED": "-3"}, "expected int >= 0 (train.seed)")]:
        with pytest.raises(PgolfError, match=re.escape(words)):
            record.apply_env(get_preset("cpu-smoke"), env)
    assert record.run_name(cfg, {"RUN_ID": "mine"}) == "mine"
    assert record.run_name(cfg, {}).endswith("_cpu-smoke_s3")
    for name in ("..", ".", "a/b", "/abs"):
        with pytest.raises(PgolfError, match="expected a folder name, not a path"):
            record.run_name(cfg, {"RUN_ID": name})


def test_bad_input_is_one_line_and_never_a_finished_run(sp1024_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = record.cli(["--preset", "cpu-smoke", "--data", str(tmp_path / "nowhere"), "--out", str(out), *sets(TINY)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("pgolf: error: ") and "nowhere" in err[-1]
    assert not (out / "result.json").exists() or json.loads((out / "result.json").read_text())["status"] == "failed"
    rc = record.cli(["--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(out),
                     "--set", "ttt.method=magic"])
    assert rc == 2 and "ttt.method" in capsys.readouterr().err


# pr1855 as it is (36M parameters, GPTQ + LQER, pergroup / zpaq, phased LoRA TTT), run briefly: one step
# of 256 tokens, one calibration sequence, the fast zpaq level, 512 validation tokens, TTT on 256-token
# chunks of 4 documents with 2 prefix documents
TINY_1855 = ["train.iterations=1", "train.train_seq_len=256", "train.eval_seq_len=256", "train.train_batch_tokens=256",
             "train.micro_batch_tokens=256", "train.val_batch_tokens=512", "train.warmup_steps=0",
             "data.val_max_tokens=512", "eval.batch_seqs=2", "quant.calibration_batches=1", "quant.calibration_seqs=1",
             "quant.calibration_seq_len=256", "quant.level=1", "ttt.eval_seq_len=256", "ttt.chunk_size=256",
             "ttt.batch_size=4", "ttt.prefix_docs=2", "ttt.global_batch_seqs=2", "ttt.global_chunk_tokens=256"]


@pytest.mark.slow
def test_pr1855_record_run_exports_and_quantize_counts_the_same_code_bytes(sp8192_data, fresh_python, tmp_path,
                                                                          cli):
    """Issue 11: a pr1855 run (trained briefly) exports, its script's wrapped size is reported, and
    `pgolf quantize` on that run reports the same code_bytes. The exported script, alone in a folder
    and without pgolf, trains, quantises (GPTQ + LQER, pergroup / zpaq) and scores (phased LoRA TTT) to
    the run's artifact, byte for byte, and its val_bpb, at the same thread count (another count sums
    in another order: the artifact then differs in its last bits)."""
    from pgolf.script.codebytes import measure

    threads = torch.get_num_threads()
    out = tmp_path / "run"
    rc = record.cli(["--preset", "pr1855", "--data", str(sp8192_data), "--max-seconds", "0", "--out", str(out),
                     *sets(TINY_1855)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "finished" and res["quant_method"] == "gptq" and res["ttt_method"] == "lora+3phase"
    assert res["lqer_tensors"] and res["compressor"] == "pergroup"
    rc, ex, err = cli("export", out, "--out", tmp_path / "records" / "pr1855_tiny", "--name", "tiny", "--author", "A")
    assert rc == 0, err
    counted = measure((tmp_path / "records" / "pr1855_tiny" / "train_gpt.py").read_text())
    assert ex["code_bytes"] == counted["code_bytes"] == res["code_bytes"] > 0
    assert ex["code_bytes_raw"] == counted["code_bytes_raw"] > counted["code_bytes"]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "train_gpt.py").write_text((tmp_path / "records" / "pr1855_tiny" / "train_gpt.py").read_text())
    r = subprocess.run([str(fresh_python), "train_gpt.py"], cwd=alone, capture_output=True, text=True, timeout=600,
                       env=fresh_env(DATA_PATH=str(sp8192_data), RUN_ID="again", OMP_NUM_THREADS=str(threads)))
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["val_bpb"] == pytest.approx(res["ttt_val_bpb"], abs=1e-6) and last["bytes_code"] == res["code_bytes"]
    again = alone / "runs" / "again"
    assert (again / "final_model.gptq.ptz").read_bytes() == Path(res["artifact"]).read_bytes()
    assert last["bytes_total"] == res["total_bytes"]
    rc, quant, err = cli("quantize", out, "--no-eval")
    assert rc == 0, err
    assert quant["code_bytes"] == res["code_bytes"] and quant["code_bytes_raw"] == res["code_bytes_raw"]
