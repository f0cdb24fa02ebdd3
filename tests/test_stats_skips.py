"""`pgolf stats` says which runs it skipped and why, and pools several configurations only with --pool."""
import json
import math

import pytest

from pgolf.runs import RunDir

LOSSES = [2.3300, 2.3320, 2.3340]


def finished(root, name, seed, loss, tag):
    run = RunDir.create(root / name)
    run.write_json("config.json", {"train": {"seed": seed}, "model": {"tag": tag}})
    run.finish({"preset": "cpu-smoke", "seed": seed, "val_loss": loss, "val_bpb": loss / math.log(2) / 2.4})


@pytest.fixture
def root(tmp_path):
    for i, loss in enumerate(LOSSES):
        finished(tmp_path, f"old_s{i}", i, loss, "old")
    failed = RunDir.create(tmp_path / "old_s7")
    failed.write_json("result.json", {"status": "failed",
                                      "error": "PgolfError: step 3: training loss is nan (diverged)"})
    RunDir.create(tmp_path / "old_s8").write_json("config.json", {})  # still running: no result.json
    (tmp_path / "old_s9").mkdir()
    (tmp_path / "old_s9" / "result.json").write_text("{not json")
    return tmp_path


def test_stats_reports_the_runs_it_skipped(root, cli):
    rc, res, err = cli("stats", "old_*", "--runs-root", root)
    assert rc == 0, err
    assert res["a"]["n"] == 3
    reasons = {s["run_dir"].rsplit("/", 1)[1]: s["reason"] for s in res["skipped"]}
    assert reasons["old_s7"] == "status failed: PgolfError: step 3: training loss is nan (diverged)"
    assert reasons["old_s8"].startswith("no result.json")
    assert reasons["old_s9"].startswith("status unreadable") and "not valid JSON" in reasons["old_s9"]
    assert {s["group"] for s in res["skipped"]} == {"a"}
    for name in reasons:
        assert f"pgolf stats: skipped {root / name}: {reasons[name]}" in err


def test_a_run_without_the_metric_is_skipped_not_fatal(root, cli):
    rc, res, err = cli("stats", "old_*", "--metric", "quant_val_bpb", "--runs-root", root)
    assert rc == 2 and "matches no finished run with 'quant_val_bpb'" in err
    RunDir(root / "old_s0").update_result({"quant_val_bpb": 1.41, "quant_val_loss": 2.34})
    RunDir(root / "old_s1").update_result({"quant_val_bpb": 1.42, "quant_val_loss": 2.35})
    rc, res, err = cli("stats", "old_*", "--metric", "quant_val_bpb", "--runs-root", root)
    assert rc == 0, err
    assert res["a"]["n"] == 2 and "result.json has no 'quant_val_bpb'" in err


def test_two_configurations_under_one_pattern_need_pool(root, cli):
    for i, loss in enumerate(LOSSES):
        finished(root, f"old_wide_s{i}", i, loss - 0.01, "wide")
    rc, res, err = cli("stats", "old_*", "--runs-root", root)
    assert rc == 2 and res is None
    line = [x for x in err.splitlines() if x.startswith("pgolf: error:")][0]
    assert "matches 2 configurations" in line and "--pool" in line
    rc, res, err = cli("stats", "old_*", "--vs", "old_wide_*", "--runs-root", root)
    assert rc == 2  # the reference pattern itself mixes both
    rc, res, err = cli("stats", "old_s?", "--vs", "old_wide_*", "--runs-root", root)
    assert rc == 0 and res["a"]["n"] == res["b"]["n"] == 3
    rc, res, err = cli("stats", "old_*", "--pool", "--runs-root", root)
    assert rc == 0 and res["a"]["n"] == 6 and len(res["a"]["config_keys"]) == 2 and len(res["groups"]) == 2


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as strict JSON parsers (jq, JavaScript) do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def test_pooled_groups_of_one_run_and_tests_without_spread_print_strict_json(root, capsys):
    from pgolf.cli import main

    finished(root, "old_lone_s0", 0, 2.32, "lone")  # a configuration with one run: no std
    assert main(["stats", "old_*", "--pool", "--runs-root", str(root)]) == 0
    res = strict_json(capsys.readouterr()[0].strip().splitlines()[-1])
    lone = [g for g in res["groups"] if g["n"] == 1][0]
    assert lone["val_bpb_std"] is None and lone["loss_std"] is None
    for i in range(2):  # two groups with no spread at all: t is infinite, Welch's df undefined
        finished(root, f"same_a_s{i}", i, 2.33, "same_a")
        finished(root, f"same_b_s{i}", i, 2.30, "same_b")
    assert main(["stats", "same_a_*", "--vs", "same_b_*", "--runs-root", str(root)]) == 0
    res = strict_json(capsys.readouterr()[0].strip().splitlines()[-1])
    assert res["t"] is None and res["df"] is None and res["significant"] is True
