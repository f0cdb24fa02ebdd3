"""`pgolf quantize` end to end on a cpu-smoke model trained on the FineWeb sample (tests/fixtures), the calibration
poison test, sweep + notebook, the pr1855 artifact's byte report, and Hessian collection."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pgolf.data import loader, shards
from pgolf.errors import PgolfError
from pgolf.quant import sweep
from pgolf.artifact.qstate import load_artifact
from pgolf.quant.gptq import dequantize, hessian_error, quantize_gptq, quantize_rtn
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.pipeline import quantize_run
from pgolf.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
# int6 everywhere, and small enough a passthrough cut that cpu-smoke's block matrices are quantised
INT6 = [f"quant.{g}_bits=6" for g in ("attn", "mlp", "embed", "other")] + ["quant.passthrough_numel=4096"]
FAST = ["quant.eval_max_tokens=8192", "quant.level=9"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread is several times faster here than two (no spinning)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smoke_run(sp1024_data, tmp_path_factory):
    from pgolf.cli import main

    out = tmp_path_factory.mktemp("quant") / "smoke"
    rc = main(["train", "--preset", "cpu-smoke", "--data", str(sp1024_data), "--out", str(out),
               "--max-seconds", "0", "--set", "train.iterations=15", "--set", "data.val_max_tokens=8192"])
    assert rc == 0
    return out


def test_quantize_cli_on_trained_cpu_smoke(smoke_run, cli):
    rc, res, err = cli("quantize", smoke_run, *sum((["--set", s] for s in INT6 + FAST + ["quant.method=gptq"]), []))
    assert rc == 0, err
    for key in ("artifact", "model_bytes", "code_bytes", "total_bytes", "limit", "under_limit",
                "val_bpb_prequant", "val_bpb"):
        assert key in res
    path = Path(res["artifact"])
    assert path.name == "final_model.gptq.ptz"
    assert res["model_bytes"] == path.stat().st_size
    assert res["total_bytes"] == res["model_bytes"] + res["code_bytes"]
    assert res["under_limit"] and res["limit"] == 16_000_000 and res["margin"] == 16_000_000 - res["total_bytes"]
    assert abs(res["val_bpb"] - res["val_bpb_prequant"]) < 0.05
    assert sum(res["bytes_by_group"].values()) == res["model_bytes"]
    stored = RunDir(smoke_run).result()
    assert stored["quant_val_bpb"] == res["val_bpb"] and stored["status"] == "finished"
    assert stored["code_bytes_raw"] > stored["code_bytes"] > 0 and "bits_per_param" in stored
    assert {"hessians_s", "quantize_s", "serialize_s", "eval_quant_s", "total_s"} <= set(stored["quant_timings"])
    assert stored["calibration"]["calibration_tokens"] == 4 * 8 * 256  # cpu-smoke: 4 batches of 8 x 256
    assert (smoke_run / "hessians.pt").is_file()


def test_quantize_on_fewer_tokens_keeps_the_runs_headline(smoke_run, cli, tmp_path):
    """A quantised score over fewer validation tokens than the run's val_bpb (`data.val_max_tokens`) is a
    quant_* score only: val_bpb / val_loss stay the run's, in result.json and in the JSON line, which says
    how many tokens were scored. Over all of them, the artifact's score becomes the headline."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    before = RunDir(run).result()
    sets = sum((["--set", s] for s in INT6 + ["quant.level=9", "quant.method=rtn"]), [])
    rc, res, err = cli("quantize", run, *sets, "--set", "data.val_max_tokens=512")
    assert rc == 0, err
    after = RunDir(run).result()
    assert res["quant_val_tokens"] == after["quant_val_tokens"] < res["val_tokens"] == before["val_tokens"]
    assert res["val_bpb"] == after["quant_val_bpb"] != before["val_bpb"]  # the JSON line: the artifact's score
    trainer = before.get("val_bpb_train", before["val_bpb"])  # the fixture's run may have been quantised before
    assert after["val_bpb"] == trainer  # the run's headline: the trainer's (a replaced artifact's score is gone)
    assert Path(after["artifact"]).name == after["artifact"]  # the file's name, as the trainer writes it
    assert "val_bpb stays the run's" in err
    rc, res, err = cli("quantize", run, *sets)
    assert rc == 0, err
    after = RunDir(run).result()
    assert res["quant_val_tokens"] == res["val_tokens"] == after["val_tokens"] == before["val_tokens"]
    assert res["val_bpb"] == after["val_bpb"] == after["quant_val_bpb"] != before["val_bpb"]
    assert after["val_bpb_train"] == trainer


def test_quantize_scores_like_eval(smoke_run, cli):
    """quantize scores in the run's evaluation setting (sliding, doc-masked here): both of its scores
    equal `pgolf eval` with the same settings (weights, then the artifact), and a pre-quantisation
    score taken in another setting is not reused."""
    sliding = ["eval.stride=64", "eval.doc_mask=true"]
    rc, flat, err = cli("quantize", smoke_run, *sum((["--set", s] for s in INT6 + FAST + ["quant.method=rtn"]), []))
    assert rc == 0, err
    rc, res, err = cli("quantize", smoke_run,
                       *sum((["--set", s] for s in INT6 + FAST + ["quant.method=rtn"] + sliding), []))
    assert rc == 0, err
    assert RunDir(smoke_run).result()["val_scoring"] == "seq_len=256 stride=64 doc_mask=1"
    assert res["val_bpb_prequant"] != flat["val_bpb_prequant"]  # recomputed, not the flat score reused
    sets = sum((["--set", s] for s in sliding), [])
    rc, ev_weights, err = cli("eval", smoke_run, "--weights", "fp", *sets)
    assert rc == 0, err
    rc, ev_artifact, err = cli("eval", smoke_run, "--artifact", res["artifact"], *sets)
    assert rc == 0, err
    assert ev_weights["val_bpb"] == pytest.approx(res["val_bpb_prequant"], abs=1e-9)
    assert ev_artifact["val_bpb"] == pytest.approx(res["val_bpb"], abs=1e-9)


def test_gptq_beats_rtn_at_int6(smoke_run):
    """On the trained model: lower BPB and lower Hessian-weighted error for every matrix."""
    df = sweep(smoke_run, {"method": ["gptq", "rtn"]}, overrides=INT6 + FAST + ['quant.compressor="zstd"'])
    bpb = dict(zip(df["method"], df["val_bpb"]))
    assert bpb["gptq"] < bpb["rtn"], bpb
    H = torch.load(smoke_run / "hessians.pt", weights_only=True)["hessians"]
    state = torch.load(smoke_run / "final_model.pt", weights_only=True)
    assert {"tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.3.mlp.proj.weight"} <= set(H)
    for name, h in H.items():
        w = state[name].float()
        e_g = hessian_error(w, dequantize(*quantize_gptq(w, h, 6, 12.0)), h)
        e_r = hessian_error(w, dequantize(*quantize_rtn(w, 6, 12.0)), h)
        assert e_g < e_r, name


def test_sweep_names_the_groups_it_really_quantised(smoke_run, capsys):
    """At the default passthrough cut, cpu-smoke's block matrices are stored fp16 whatever the bits say: the
    row says which groups were quantised, and a warning names the groups whose setting changes nothing.
    A model key among the overrides is refused, as `pgolf quantize` refuses it."""
    df = sweep(smoke_run, {"groups": ["attn+mlp+embed"], "bits": [6]}, overrides=["quant.level=9"], evaluate=False)
    assert df["quantised_groups"].tolist() == ["embed"] and df["groups"].tolist() == ["attn+mlp+embed"]
    err = capsys.readouterr().err
    assert "no matrix of group(s) attn, mlp is quantised" in err and "quant.passthrough_numel=65,536" in err
    df = sweep(smoke_run, {"groups": ["attn+mlp"]}, overrides=INT6 + ["quant.level=9"], evaluate=False)
    assert set(df["quantised_groups"][0].split("+")) >= {"attn", "mlp"}  # passthrough cut 4096: blocks quantised
    assert "no matrix of group" not in capsys.readouterr().err
    with pytest.raises(PgolfError, match="quant.sweep may change only quant"):
        sweep(smoke_run, {"bits": [6]}, overrides=["model.num_layers=2"], evaluate=False)


def _poison(monkeypatch):
    """Any access to the validation split raises."""
    def guard(fn):
        def wrapped(*a, **kw):
            if any("val" in str(x) for x in list(a[1:2]) + [Path(str(a[0])).name if a else ""]):
                raise AssertionError(f"validation data touched during calibration: {fn.__name__}{a}")
            return fn(*a, **kw)
        return wrapped
    for name in ("list_shards", "load_split", "read_shard", "read_header"):
        monkeypatch.setattr(shards, name, guard(getattr(shards, name)))


def test_calibration_never_reads_validation(smoke_run, monkeypatch):
    _poison(monkeypatch)
    # a new seed: the cached Hessians do not apply, so calibration really runs under the poison
    res = quantize_run(smoke_run, INT6 + ["quant.method=gptq", "quant.calibration_seed=7", "quant.compressor=\"zstd\""],
                       evaluate=False)
    assert res["calibration"]["cached"] is False and res["model_bytes"] > 0
    # and the poison works: calibration pointed at the validation shards fails
    monkeypatch.setattr(loader, "_train_files", lambda d: sorted(Path(d).glob("fineweb_val_*.bin")))
    with pytest.raises(AssertionError, match="validation data touched"):
        quantize_run(smoke_run, INT6 + ["quant.method=gptq", "quant.calibration_seed=8"], evaluate=False)


def test_over_the_limit_fails_with_strict_and_warns_without(smoke_run, cli):
    args = ["quantize", smoke_run, "--no-eval", "--set", "quant.method=\"rtn\"", "--set", "quant.limit_bytes=1000",
            "--set", "quant.compressor=\"zstd\""]
    rc, res, err = cli(*args, "--strict")
    assert rc == 2 and "over the 1,000-byte limit" in err and len(err.strip().splitlines()) == 1
    rc, res, err = cli(*args)
    assert rc == 0 and res["under_limit"] is False
    assert "WARNING: ARTIFACT OVER THE 1,000-BYTE LIMIT" in err and "NOT a valid submission" in err


def test_notebook_runs_headless(smoke_run, tmp_path, monkeypatch):
    import nbformat
    import papermill as pm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread (see one_thread)
    out = tmp_path / "nb.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "gptq_precision_vs_bytes.ipynb"), str(out), kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path),
                        parameters=dict(run_dir=str(smoke_run), bits=[5, 6], clips=[12.0], lqer_ranks=[2],
                                        overrides=INT6[-1:] + FAST + ['quant.compressor="zstd"'],
                                        figures_dir=str(tmp_path / "fig")))
    nb = nbformat.read(out, as_version=4)
    assert any("Pareto" in str(o) or "pareto" in str(o) for c in nb.cells for o in c.get("outputs", []))
    assert (tmp_path / "fig" / "gptq_precision_vs_bytes.png").is_file()
    assert (tmp_path / "fig" / "gptq_precision_vs_bytes.svg").is_file()


def test_pr1855_at_init_report_sums_to_file(sp8192_data, tmp_path):
    """The record's quantisation settings (GPTQ int6/int7, SDClip 13/11.5/14, LQER r4 top-3 asym, pergroup)
    on the 35.9 M-parameter model at initialisation. Cheaper here than in the record: 1 calibration batch of
    2 x 128 tokens and compression level 1 instead of the strongest (the format is the same)."""
    from pgolf.model import build_model
    from pgolf.presets import get_preset

    cfg = get_preset("pr1855", [f"data.path={json.dumps(str(sp8192_data))}", "quant.calibration_batches=1",
                                "quant.calibration_seqs=2", "quant.calibration_seq_len=128", "quant.level=1"])
    run = RunDir.create(tmp_path / "pr1855")
    run.write_json("config.json", cfg.to_dict())
    torch.manual_seed(0)
    torch.save(build_model(cfg).state_dict(), run.file("final_model.pt"))
    res = quantize_run(run.path, evaluate=False, allow_unfinished=True)  # weights without a training run
    size = Path(res["artifact"]).stat().st_size
    assert res["model_bytes"] == size and sum(res["bytes_by_group"].values()) == size
    assert res["total_bytes"] == size + res["code_bytes"]
    assert res["quant_methods"] == ["absmax_int8", "gptq"]  # every big matrix GPTQ'd, sparse gates int8
    assert len(res["lqer_tensors"]) == 3 and res["compressor"] == "pergroup"
    assert cfg.quant.group_codec == "zpaq" and res["group_codec"] == "zpaq"
    assert Path(res["artifact"]).read_bytes()[:4] == b"PGRP"
    assert res["params_by_group"]["embed"] == 8192 * 512 and sum(res["params_by_group"].values()) == 35_945_671
    assert 2.0 < res["bits_per_param"] < 8.0
    state = load_artifact(Path(res["artifact"]).read_bytes())
    fresh = build_model(cfg, "meta")
    assert set(state) == set(fresh.state_dict())


class _Looped(nn.Module):
    """A stand-in with the GPT names: one block visited twice, tied head input from `hidden`."""
    def __init__(self):
        super().__init__()
        self.cfg = type("C", (), {"tie_embeddings": True})()
        self.tok_emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16, bias=False)

    def hidden(self, idx):
        x = self.tok_emb(idx)
        return self.fc(self.fc(x))  # the same layer twice (depth recurrence)


def test_collect_hessians_accumulates_every_visit_over_the_batches():
    """H = the sum of X^T X over every visit of every batch, divided by the number of batches (the
    record's `hessians[name] / n_calibration_batches`), not by the tokens or the visits."""
    m = _Looped()
    batches = [torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (3, 5))]
    H = collect_hessians(m, batches, min_numel=0)
    want_fc, want_head = torch.zeros(16, 16), torch.zeros(16, 16)
    for idx in batches:
        x1 = m.tok_emb(idx).reshape(-1, 16)
        x2 = m.fc(x1)
        h = m.fc(x2)
        want_fc += x1.T @ x1 + x2.T @ x2
        want_head += h.T @ h
    torch.testing.assert_close(H["fc.weight"], want_fc / 2)
    torch.testing.assert_close(H["tok_emb.weight"], want_head / 2)
