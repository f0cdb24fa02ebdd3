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
    rc, _, err = run_cli(["stats", "old_*", "--runs-root", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and err.strip() == (f"pgolf: error: {tmp_path / 'nowhere'}: runs root not found "
                                       "(pass --runs-root DIR, or a path glob such as DIR/old_*)")


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


# ---- which tokens a score was measured on

def staged(loss_bpb, ttt_tokens):
    """A result as `pgolf train` + `pgolf eval --ttt` leave it (stages; the trainer's export is a stage only)."""
    from pgolf.runs import stage

    score = lambda b, n: {"val_bpb": b, "val_loss": b * 1.6, "tokens": n, "bytes": 3 * n}  # noqa: E731
    return {"val_bpb": loss_bpb, "val_loss": loss_bpb * 1.6, "val_tokens": 36_864, "ttt_val_bpb": loss_bpb - 0.03,
            "ttt_val_tokens": ttt_tokens, "ttt_val_loss": (loss_bpb - 0.03) * 1.6,
            "stages": [stage("pre-quant", score(loss_bpb, 36_864), by="train", weights="fp", setting="s"),
                       stage("quantised", score(loss_bpb + 0.01, 36_864), by="train", weights="artifact", setting="s"),
                       stage("ttt", score(loss_bpb - 0.03, ttt_tokens), by="eval", weights="artifact", setting="t")]}


def test_metric_tokens_and_the_trainers_export_stage():
    r = staged(2.0, 4096)
    assert stats.metric_tokens(r, "val_bpb") == 36_864
    assert stats.metric_tokens(r, "ttt_val_bpb") == 4096
    # no flat quant_val_bpb: the trainer's export stage is the run's artifact score, with its own loss
    assert stats.metric_value(r, "quant_val_bpb") == 2.01 and stats.metric_tokens(r, "quant_val_bpb") == 36_864
    assert stats.loss_nats(r, "quant_val_bpb") == pytest.approx(2.01 * 1.6)
    assert stats.metric_tokens({"val_bpb": 1.0, "val_tokens": 100}, "val_bpb") == 100  # flat keys only
    assert stats.metric_tokens({"val_bpb": 1.0}, "val_bpb") is None


def write_staged(root, prefix, losses, ttt_tokens):
    for i, loss in enumerate(losses):
        run = RunDir.create(root / f"{prefix}_s{i}")
        run.write_json("config.json", {"train": {"seed": i}, "model": {"tag": prefix}})
        run.finish({"preset": "cpu-smoke", "seed": i, **staged(loss / 1.6, ttt_tokens)})


def test_cli_stats_says_loudly_when_token_sets_differ(tmp_path, capsys):
    write_staged(tmp_path, "old", A, 36_864)
    write_staged(tmp_path, "short", B_FAR, 4096)
    write_staged(tmp_path, "full", B_FAR, 36_864)
    argv = ["stats", "old_*", "--metric", "ttt_val_bpb", "--runs-root", str(tmp_path)]
    rc, out, err = run_cli([*argv, "--vs", "short_*"], capsys)
    assert rc == 0 and out["equal_tokens"] is False
    assert out["a"]["tokens"] == [36_864] and out["b"]["tokens"] == [4096]
    assert "36,864" in out["warnings"][0] and "4,096" in out["warnings"][0]
    assert "pgolf stats: WARNING: ttt_val_bpb was scored on different numbers of tokens" in err
    rc, out, err = run_cli([*argv, "--vs", "full_*"], capsys)
    assert rc == 0 and out["equal_tokens"] is True and out["warnings"] == [] and "WARNING" not in err


def test_cli_stats_says_loudly_when_the_latest_scores_come_from_different_stages(tmp_path, capsys):
    """`val_bpb` is each run's latest score: after `eval --ttt` a run's is its TTT score, another's may still
    be the trainer's. Compared, the JSON names each group's stages and warns; total_bytes_runs says how
    many runs the bytes mean is over."""
    write_staged(tmp_path, "old", A, 36_864)
    for i, loss in enumerate(B_FAR):
        run = RunDir.create(tmp_path / f"adapted_s{i}")
        run.write_json("config.json", {"train": {"seed": i}, "model": {"tag": "adapted"}})
        r = staged(loss / 1.6, 36_864)
        run.finish({"preset": "cpu-smoke", "seed": i, **r, "val_bpb": r["ttt_val_bpb"], "val_loss": r["ttt_val_loss"],
                    **({"total_bytes": 15_000_000} if i == 0 else {})})
    rc, out, err = run_cli(["stats", "old_*", "--vs", "adapted_*", "--runs-root", str(tmp_path)], capsys)
    assert rc == 0 and out["a"]["stages"] == ["pre-quant"] and out["b"]["stages"] == ["ttt"]
    assert out["equal_tokens"] is True and len(out["warnings"]) == 1
    assert "val_bpb comes from different scoring stages (old_*: pre-quant; adapted_*: ttt)" in out["warnings"][0]
    assert "pgolf stats: WARNING: val_bpb comes from different scoring stages" in err
    assert out["b"]["total_bytes_mean"] == 15_000_000 and out["b"]["total_bytes_runs"] == 1
    rc, out, err = run_cli(["stats", "old_*", "--vs", "adapted_*", "--metric", "ttt_val_bpb", "--runs-root",
                            str(tmp_path)], capsys)
    assert rc == 0 and out["warnings"] == [] and out["a"]["stages"] == out["b"]["stages"] == ["ttt"]


def test_pairwise_flags_unequal_tokens_and_explains_too_few_seeds(tmp_path):
    rows = [{"config_key": k, "preset": k, "seed": i, **staged(v / 1.6, n)}
            for k, vals, n in (("ref", A, 36_864), ("far", B_FAR, 4096)) for i, v in enumerate(vals)]
    df = pd.DataFrame(rows)
    pw = stats.pairwise(df, "ttt_val_bpb")
    assert pw["equal_tokens"].tolist() == [False]
    assert stats.pairwise(df, "val_bpb")["equal_tokens"].tolist() == [True]
    assert stats.seed_note(df) == ""
    one = pd.concat([df, pd.DataFrame([{"config_key": "solo", "preset": "solo", "seed": 0, **staged(1.4, 4096)}])])
    assert len(stats.pairwise(one)) == 1  # solo has one seed: no test for it
    note = stats.seed_note(one, labels={"solo": "train.max_seconds=40"})
    assert note.startswith("the significance test needs at least 2 seeds per configuration; too few: "
                           "train.max_seconds=40 (1 seed)")
    assert stats.seed_note(df.iloc[:3]) == "only one configuration: nothing to compare it with yet"
    assert "nothing to compare yet" in stats.seed_note(pd.DataFrame())
