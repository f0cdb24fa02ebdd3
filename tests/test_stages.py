"""Stages compare like with like (issue 15), and readers never take an incomplete log for a finished one
(issue 19): the stage records of `pgolf.runs`, the registry's stage table, and the JSON-lines readers."""
from __future__ import annotations

import json

import pytest

from pgolf.errors import PgolfError
from pgolf.lab.registry import load, load_stages, read_convergence
from pgolf.runs import RunDir, check_result, stage, stages


def _score(bpb: float, tokens: int) -> dict:
    return {"val_bpb": bpb, "val_loss": bpb * 1.7, "tokens": tokens, "bytes": tokens * 2}


def _finished_run(root, name: str, seed: int) -> RunDir:
    run = RunDir.create(root / name)
    run.write_json("config.json", {"train": {"seed": seed}})
    how = "seq_len=64 stride=0 doc_mask=0"
    run.finish({"preset": "cpu-smoke", "seed": seed, "val_bpb": 1.5,
                "stages": [stage("pre-quant", _score(1.5, 4096), by="train", weights="fp", setting=how),
                           stage("quantised", _score(1.52, 4096), by="train", weights="artifact", setting=how,
                                 artifact="final_model.int8.ptz", method="int8")]})
    return run


def test_a_stage_on_fewer_tokens_is_flagged(tmp_path):
    run = _finished_run(tmp_path, "a", 1)
    assert run.result()["stages_comparable"] is True
    assert [s["fewer_tokens"] for s in stages(run.result())] == [False, False]
    ttt = stage("ttt", _score(1.40, 1024), by="eval", weights="artifact", setting="seq_len=64 (test-time training)",
                artifact="final_model.int8.ptz", method="lora")
    result = run.update_result({"ttt_val_bpb": 1.40}, [ttt])
    assert result["stages_comparable"] is False
    assert [(s["name"], s["tokens"], s["fewer_tokens"]) for s in stages(result)] == [
        ("pre-quant", 4096, False), ("quantised", 4096, False), ("ttt", 1024, True)]
    # a later stage on more tokens flags the earlier ones: the flag is always against the whole run
    more = stage("pre-quant", _score(1.49, 8192), by="eval", weights="fp", setting="seq_len=64 stride=0 doc_mask=0")
    result = run.update_result({}, [more])
    assert [s["fewer_tokens"] for s in stages(result)] == [True, True, True, False]
    assert stages({"val_bpb": 1.0}) == []  # a result written before stages existed has none
    with pytest.raises(ValueError, match="stage name"):
        stage("final", _score(1.0, 1), by="eval", weights="fp", setting="")


def test_registry_has_one_row_per_stage(tmp_path):
    _finished_run(tmp_path, "a", 1)
    b = _finished_run(tmp_path, "b", 2)
    b.update_result({}, [stage("ttt", _score(1.4, 1024), by="eval", weights="artifact", setting="ttt")])
    df = load_stages(tmp_path)
    assert len(df) == 5 and set(df["run_id"]) == {"a", "b"}
    row = df[(df["run_id"] == "b") & (df["name"] == "ttt")].iloc[0]
    assert row["seed"] == 2 and row["tokens"] == 1024 and bool(row["fewer_tokens"])
    assert not df[df["run_id"] == "a"]["fewer_tokens"].any()
    flat = load(tmp_path).set_index("run_id")
    assert bool(flat.loc["a", "stages_comparable"]) and not bool(flat.loc["b", "stages_comparable"])


def test_registry_names_a_malformed_result_instead_of_failing(tmp_path):
    _finished_run(tmp_path, "a", 1)
    bad = _finished_run(tmp_path, "b", 2)
    bad.write_json("result.json", {**bad.result(), "val_bpb": "1.5"})
    df = load(tmp_path).set_index("run_id")
    assert "val_bpb is '1.5'" in df.loc["b", "result_error"] and df.loc["a", "val_bpb"] == 1.5
    with pytest.raises(PgolfError, match="val_bpb is '1.5', expected a number"):
        bad.result()
    with pytest.raises(PgolfError, match="stages is not a list"):
        check_result({"stages": {"a": 1}}, "result.json")


def test_registry_leaves_out_listed_runs_that_are_no_longer_finished(tmp_path):
    """index.jsonl lists every run that finished once; a folder since deleted, or reused by an attempt that
    was interrupted, is not a finished run any more: left out of load / load_stages with a warning naming
    it (it used to give a row of index-line values whose config and scores were missing)."""
    import shutil

    _finished_run(tmp_path, "a", 1)
    b, c = _finished_run(tmp_path, "b", 2), _finished_run(tmp_path, "c", 3)
    shutil.rmtree(b.path)
    c.write_json("result.json", {"status": "interrupted"})
    with pytest.warns(UserWarning, match=r"2 listed run\(s\) left out") as seen:
        df = load(tmp_path)
    assert list(df["run_id"]) == ["a"]
    msg = str(seen[0].message)
    assert f"{b.path} (its folder is gone)" in msg and f"{c.path} (status 'interrupted')" in msg
    with pytest.warns(UserWarning):
        assert set(load_stages(tmp_path)["run_id"]) == {"a"}


def _ttt_rows(eval_id: str, n: int, done: bool) -> list[str]:
    rows = [{"eval_id": eval_id, "method": "lora", "kind": "batch", "batch": i, "tokens": 100 * (i + 1),
             "bpb": 2.0 - i / 10} for i in range(n)]
    if done:
        rows.append({"eval_id": eval_id, "method": "lora", "kind": "done", "tokens": 100 * n, "bpb": 1.5})
    return [json.dumps(r) for r in rows]


def test_convergence_reader_skips_an_evaluation_that_did_not_finish(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # A finished; B killed mid-write (no done row, last line cut short); C appended after the torn line
    lines = _ttt_rows("A", 3, True) + _ttt_rows("B", 2, False)
    torn = json.dumps({"eval_id": "B", "kind": "batch", "batch": 2, "tokens": 300})[:25]
    (run / "ttt.jsonl").write_text("\n".join(lines) + "\n" + torn)
    df = read_convergence([run])
    assert set(df["eval_id"]) == {"A"} and list(df["kind"]) == ["batch"] * 3 + ["done"] and df["complete"].all()
    every = read_convergence([run], eval_id="all", incomplete=True)
    assert list(every.groupby("eval_id")["complete"].first().items()) == [("A", True), ("B", False)]
    assert len(every) == 6  # the torn line is left out
    with open(run / "ttt.jsonl", "a") as f:  # the next evaluation appends after the torn line
        f.write("\n".join(_ttt_rows("C", 2, True)) + "\n")
    df = read_convergence([run])
    assert set(df["eval_id"]) == {"C"} and len(df) == 2  # the first C row was glued to the torn line


def test_read_metrics_leaves_out_a_line_cut_short(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 7.0}\n{"step": 2, "train_lo')
    assert run.read_metrics() == [{"step": 1, "train_loss": 7.0}]


def test_a_replaced_artifact_leaves_no_flat_score_behind():
    """A record run (val_bpb: the artifact's TTT score) whose artifact `pgolf quantize` replaces: every
    flat score of the old artifact is cleared, val_bpb goes back to the trainer's, fp evaluations stay."""
    from pgolf.runs import replaced_artifact

    art = {"weights": "artifact", "artifact": "final_model.gptq.ptz", "setting": "s", "artifact_sha256": "abc"}
    result = {"artifact": "runs/r/final_model.gptq.ptz", "val_bpb": 1.06, "val_loss": 2.74, "val_bpb_train": 1.09,
              "quant_val_bpb": 1.08, "quant_val_loss": 2.79, "ttt_val_bpb": 1.06, "ttt_val_loss": 2.74,
              "ttt_method": "lora", "ttt_val_bpb_no_ttt": 1.08, "ttt_updates": 9, "eval_val_bpb": 1.09,
              "eval_weights": "fp", "eval_artifact": "runs/r/final_model.pt",
              "stages": [stage("pre-quant", _score(1.09, 4096), by="record", weights="fp", setting="s"),
                         stage("quantised", _score(1.08, 4096), by="record", **art),
                         stage("ttt", {**_score(1.06, 4096), "val_loss": 2.74}, by="record", **art)]}
    updates, old = replaced_artifact(result)
    assert updates == {"quant_val_bpb": None, "quant_val_loss": None, "ttt_val_bpb": None, "ttt_val_loss": None,
                       "ttt_method": None, "ttt_val_bpb_no_ttt": None, "ttt_updates": None,
                       "val_bpb": 1.09, "val_loss": pytest.approx(1.09 * 1.7)}  # the fp eval_* stay
    assert old == {k: result[k] for k in updates}
    assert replaced_artifact(result, "abc") == ({}, {})  # the very same bytes again: nothing replaced
    assert replaced_artifact(result, "def")[0] == updates
    trained = {"val_bpb": 1.09, "stages": result["stages"][:1]}  # only trained: nothing describes an artifact
    assert replaced_artifact(trained) == ({}, {})
