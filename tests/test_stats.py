"""pgolf.lab.stats and `pgolf stats`: seed statistics and the challenge's significance criterion."""
import json
import math

import pandas as pd
import pytest

from pgolf import cli
from pgolf.lab import stats
from pgolf.runs import RunDir

# Per-seed val_loss (nats/token). Equal sizes and equal sample variances make Welch's df exactly 4,
# where the t distribution has a closed form, so the p-value below is computed by hand.
A = [2.3300, 2.3320, 2.3340]
B_CLOSE = [2.3200, 2.3220, 2.3240]  # 0.010 better
B_FAR = [2.3150, 2.3170, 2.3190]  # 0.015 better


def t4_sf(t):
    """P(T > t) for Student's t with 4 degrees of freedom (closed form)."""
    u = t * t / 4
    return 0.5 - (3 / 8) * (t / math.sqrt(1 + u)) * (1 - t * t / (12 * (1 + u)))


def hand_p(a, b, margin=0.005):
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a) / (n - 1)
    vb = sum((x - mb) ** 2 for x in b) / (n - 1)
    t = (ma - mb - margin) / math.sqrt(va / n + vb / n)
    df = (va / n + vb / n) ** 2 / ((va / n) ** 2 / (n - 1) + (vb / n) ** 2 / (n - 1))
    assert df == pytest.approx(4.0)
    return t4_sf(t)


def make_runs(root, prefix, losses, bytes_per_token=2.4, preset="cpu-smoke"):
    for i, loss in enumerate(losses):
        run = RunDir.create(root / f"{prefix}_s{i}")
        run.write_json("config.json", {"train": {"seed": i}, "model": {"tag": prefix}})
        bpb = loss / math.log(2) / bytes_per_token
        run.finish({"preset": preset, "seed": i, "val_loss": loss, "val_bpb": bpb,
                    "quant_val_bpb": bpb + 0.01, "total_bytes": 1_000_000})


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def test_welch_matches_hand_computed_p_value():
    p = hand_p(A, B_CLOSE)
    assert p == pytest.approx(0.018794, abs=2e-6)
    res = stats.welch(A, B_CLOSE)
    assert res["p_value"] == pytest.approx(p, rel=1e-9)
    assert res["delta_nats"] == pytest.approx(0.010)
    assert res["df"] == pytest.approx(4.0)
    assert not res["significant"]  # 0.010 better, but not clearly more than 0.005 with 3 seeds
    far = stats.welch(A, B_FAR)
    assert far["p_value"] == pytest.approx(hand_p(A, B_FAR), rel=1e-9) and far["significant"]


def test_margin_is_part_of_the_null():
    # 0.004 better with no noise at all is still not a record: H0 is "at most 0.005 better".
    a = [2.0, 2.0001, 2.0002]
    b = [x - 0.004 for x in a]
    assert stats.welch(a, b)["p_value"] > 0.5


def test_loss_nats_conversion():
    r = {"val_loss": 2.0, "val_bpb": 1.0, "quant_val_bpb": 1.01, "ttt_val_bpb": 0.99, "ttt_val_loss": 1.9}
    assert stats.loss_nats(r, "val_bpb") == 2.0
    assert stats.loss_nats(r, "quant_val_bpb") == pytest.approx(2.02)  # same bytes/token as val_bpb
    assert stats.loss_nats(r, "ttt_val_bpb") == 1.9  # the run's own loss wins


def test_metric_stages_after_quantize():
    trained = {"val_loss": 2.0, "val_bpb": 1.0}
    quantised = {"val_loss": 2.02, "val_bpb": 1.01, "quant_val_bpb": 1.01, "val_bpb_prequant": 1.0,
                 "val_loss_prequant": 2.0}
    assert stats.metric_value(trained, "val_bpb_prequant") == 1.0  # never quantised: the trainer's score
    assert stats.loss_nats(trained, "val_bpb_prequant") == 2.0
    assert stats.metric_value(quantised, "val_bpb_prequant") == 1.0
    assert stats.loss_nats(quantised, "val_bpb_prequant") == 2.0 and stats.loss_nats(quantised, "val_bpb") == 2.02
    assert stats.metric_value(trained, "quant_val_bpb") is None
    assert stats.metric_value({"val_bpb": 1.0, "quant_val_bpb": 1.01}, "val_bpb_prequant") is None


def test_cli_stats_vs(tmp_path, capsys):
    make_runs(tmp_path, "old", A)
    make_runs(tmp_path, "new", B_FAR)
    rc, out, _ = run_cli(["stats", "old_*", "--vs", "new_*", "--runs-root", str(tmp_path)], capsys)
    assert rc == 0
    assert {"a", "b", "delta_nats", "p_value", "significant"} <= set(out)
    assert out["a"]["n"] == 3 and out["b"]["n"] == 3
    assert out["delta_nats"] == pytest.approx(0.015)
    assert out["p_value"] == pytest.approx(hand_p(A, B_FAR), rel=1e-9)
    assert out["significant"] is True
    # the same test on the quantised BPB (converted to nats with each run's bytes per token)
    rc, q, _ = run_cli(["stats", "old_*", "--vs", "new_*", "--metric", "quant_val_bpb",
                        "--runs-root", str(tmp_path)], capsys)
    assert rc == 0 and q["metric"] == "quant_val_bpb" and q["delta_nats"] == pytest.approx(0.015, abs=1e-4)
    # a pattern with a slash is a path glob (the README's `pgolf stats 'runs/*a*' --vs 'runs/*b*'`)
    rc, g, _ = run_cli(["stats", f"{tmp_path}/old_*", "--vs", f"{tmp_path}/new_*"], capsys)
    assert rc == 0 and g["p_value"] == out["p_value"] and g["a"]["n"] == 3


def test_cli_stats_single_group_and_errors(tmp_path, capsys):
    make_runs(tmp_path, "old", A)
    rc, out, _ = run_cli(["stats", "old_*", "--runs-root", str(tmp_path)], capsys)
    assert rc == 0 and out["b"] is None and out["p_value"] is None and out["significant"] is False
    assert out["a"]["mean"] == pytest.approx(sum(A) / 3 / math.log(2) / 2.4)
    assert out["a"]["std"] > 0 and len(out["groups"]) == 1
    rc, _, err = run_cli(["stats", "nope_*", "--runs-root", str(tmp_path)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "matches no finished run" in err
    rc, _, err = run_cli(["stats", "old_s0", "--vs", "old_s1", "--runs-root", str(tmp_path)], capsys)
    assert rc == 2 and "at least 2 runs" in err


def test_by_config_and_pairwise():
    rows = [{"config_key": k, "preset": k, "seed": i, "val_loss": v, "val_bpb": v / 1.6, "total_bytes": 10}
            for k, vals in (("ref", A), ("close", B_CLOSE), ("far", B_FAR)) for i, v in enumerate(vals)]
    df = pd.DataFrame(rows)
    table = stats.by_config(df)
    assert list(table["config_key"]) == ["far", "close", "ref"]  # best first
    assert table["n"].tolist() == [3, 3, 3]
    pw = stats.pairwise(df, reference="ref")
    assert set(pw["b"]) == {"close", "far"} and (pw["a"] == "ref").all()
    sig = dict(zip(pw["b"], pw["significant"]))
    assert sig == {"close": False, "far": True}
