"""pgolf.lab.plots: every standard figure is written as PNG and SVG under a stable name."""
from pathlib import Path

import pandas as pd
import pytest

from pgolf.lab import plots, registry
from pgolf.errors import PgolfError
from pgolf.lab.registry import load
from pgolf.runs import RunDir, stage


def fake_run(root, name, preset, seed, key, bpb, total_bytes, steps=30):
    run = RunDir.create(root / name)
    run.write_json("config.json", {"model": {"key": key}, "train": {"seed": seed}})
    for s in range(0, steps + 1, 5):
        row = {"step": s, "time_s": s * 0.1, "train_loss": 7.0 - 0.1 * s}
        if s % 15 == 0:
            row.update(val_loss=7.05 - 0.1 * s, val_bpb=(7.05 - 0.1 * s) / 1.7)
        run.append_jsonl("metrics.jsonl", row)
    # as after `pgolf quantize` + `pgolf eval --ttt`: val_bpb is the artifact's score now
    run.finish({"preset": preset, "seed": seed, "val_loss": (bpb + 0.01) * 1.7, "val_bpb": bpb + 0.01,
                "val_bpb_prequant": bpb, "quant_val_bpb": bpb + 0.01, "ttt_val_bpb": bpb - 0.02,
                "total_bytes": total_bytes})
    return run


def ttt_rows():
    """`ttt.jsonl` rows as `read_convergence` returns them: two runs, batches over two phases, TTT on / off."""
    rows = []
    for run, method, gain in (("r_lora", "lora", 0.02), ("r_sgd", "sgd", 0.01)):
        for b in range(8):
            phase, tokens = b // 4, 1000 * (b + 1)
            rows.append({"run": run, "eval_id": "e1", "method": method, "kind": "batch", "batch": b,
                         "phase": phase, "tokens": tokens, "bytes": 4 * tokens, "bpb": 1.1 - gain * b / 8,
                         "bpb_no_ttt": 1.1})
            if b == 3:
                rows.append({**rows[-1], "kind": "phase", "phase": 1})
        rows.append({**rows[-1], "kind": "done"})
    return pd.DataFrame(rows)


def assert_written(paths, stem, out):
    assert [Path(p).name for p in paths] == [f"{stem}.png", f"{stem}.svg"]
    for p in paths:
        assert Path(p).parent == Path(out) and Path(p).stat().st_size > 1000


def test_loss_curves_signature_and_names(tmp_path):
    run = fake_run(tmp_path / "runs", "r1", "cpu-smoke", 1, "k", 1.5, 10)
    out = tmp_path / "figures"
    paths = plots.plot_loss_curves(run.path, out_dir=str(out))  # the call `make run` makes
    assert_written(paths, "loss_r1", out)
    # stable: the same data gives the same SVG bytes
    svg = Path(paths[1]).read_bytes()
    assert Path(plots.plot_loss_curves(run.path, out_dir=out)[1]).read_bytes() == svg
    (tmp_path / "empty").mkdir()
    with pytest.raises(PgolfError, match="no metrics"):
        plots.plot_loss_curves(tmp_path / "empty", out_dir=out)


def test_pareto_front():
    pts = [(10, 1.3), (12, 1.2), (11, 1.35), (15, 1.1), (16, 1.15), (9, 1.5)]
    assert plots.pareto_front(pts) == [5, 0, 1, 3]


def test_bpb_vs_artifact_precision_and_ttt(tmp_path):
    root = tmp_path / "runs"
    for i, (key, bpb, size) in enumerate([("a", 1.30, 15.2e6), ("a", 1.31, 15.2e6), ("b", 1.25, 15.9e6),
                                          ("b", 1.26, 15.9e6), ("c", 1.22, 16.3e6)]):
        fake_run(root, f"{key}_s{i}", f"p{key}", i, key, bpb, int(size))
    df = load(root)
    pts = plots.config_points(df)
    assert pts["n"].tolist() == [2, 2, 1]
    assert pts.loc[0, "val_bpb_prequant"] == pytest.approx(1.305) and pts.loc[2, "val_bpb_prequant_std"] == 0.0
    assert pts.loc[0, "quant_val_bpb"] == pytest.approx(1.315) and pts.loc[0, "ttt_val_bpb"] == pytest.approx(1.285)
    out = tmp_path / "fig"
    assert_written(plots.plot_bpb_vs_artifact(df, out_dir=out), "bpb_vs_artifact", out)
    prec = pd.DataFrame({"label": ["int8", "int6", "int5"], "total_bytes": [20e6, 15.9e6, 13e6],
                         "val_bpb": [1.20, 1.21, 1.24]})
    prec.attrs.update(prequant_bpb=1.19, limit=16_000_000)  # as `quant.sweep` returns it
    paths = plots.plot_precision_vs_bytes(prec, out_dir=out)
    assert_written(paths, "gptq_precision_vs_bytes", out)
    assert Path(plots.plot_precision_vs_bytes(prec, out_dir=out)[1]).read_bytes() == Path(paths[1]).read_bytes()
    with pytest.raises(PgolfError, match="val_bpb"):
        plots.plot_precision_vs_bytes(prec.drop(columns="val_bpb"), out_dir=out)
    ttt = ttt_rows()
    paths = plots.plot_ttt_convergence(ttt, out_dir=out)
    assert_written(paths, "ttt_convergence", out)
    assert Path(plots.plot_ttt_convergence(ttt, out_dir=out)[1]).read_bytes() == Path(paths[1]).read_bytes()
    with pytest.raises(PgolfError, match="no ttt.jsonl rows"):
        plots.plot_ttt_convergence(pd.DataFrame(), out_dir=out)
    with pytest.raises(PgolfError, match="lack column"):
        plots.plot_ttt_convergence(ttt.drop(columns="eval_id"), out_dir=out)
    est = {"base": {"params": 10, "code_bytes": 5, "bytes_by_kind": {"mlp": 50, "attn": 20}},
           "tweak": {"params": 12, "code_bytes": 5, "bytes_by_kind": {"mlp": 50, "attn": 20, "gate": 3}}}
    assert_written(plots.plot_size_breakdown(est, out_dir=out), "architecture_bytes", out)
    with pytest.raises(PgolfError):
        plots.plot_bpb_vs_artifact(pd.DataFrame(), out_dir=out)


# ---- BPB vs artifact: stages, labels, token counts, axes

def staged_run(root, name, seed, seconds, bpb, ttt_tokens=None, total_bytes=1_100_000):
    """A run as `pgolf train` (+ `pgolf eval --ttt`) leaves it: stages, and flat keys only where the
    commands set them (the trainer's export score is a stage, not `quant_val_bpb`)."""
    run = RunDir.create(root / name)
    run.write_json("config.json", {"model": {"num_layers": 4}, "train": {"seed": seed, "max_seconds": seconds},
                                   "data": {"path": f"/data/{seed}"}})
    score = lambda b, n: {"val_bpb": b, "val_loss": b * 1.6, "tokens": n, "bytes": 3 * n}  # noqa: E731
    st = [stage("pre-quant", score(bpb, 36_864), by="train", weights="fp", setting="s"),
          stage("quantised", score(bpb + 0.01, 36_864), by="train", weights="artifact", setting="s")]
    flat = {}
    if ttt_tokens:
        st.append(stage("ttt", score(bpb - 0.03, ttt_tokens), by="eval", weights="artifact", setting="t"))
        flat = {"ttt_val_bpb": bpb - 0.03, "ttt_val_tokens": ttt_tokens}
    run.finish({"preset": "cpu-smoke", "seed": seed, "val_bpb": bpb, "val_loss": bpb * 1.6, "val_tokens": 36_864,
                "total_bytes": total_bytes, "stages": st, **flat})


def series(fig):
    """{legend label: Line2D} of the figure's first axes."""
    return {ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}


def test_bpb_vs_artifact_draws_every_stage_and_names_configs_by_their_difference(tmp_path):
    root = tmp_path / "runs"
    for s in (1, 2):
        staged_run(root, f"short_s{s}", s, 20, 2.00 + 0.01 * s, total_bytes=1_120_000)
        staged_run(root, f"long_s{s}", s, 40, 1.90 + 0.01 * s, total_bytes=1_140_000)
    fig = plots.bpb_vs_artifact_figure(load(root))
    lines = series(fig)
    # one series per stage (the trainer's export is drawn although no flat quant_val_bpb exists) ...
    assert {"pre-quant", "artifact"} <= set(lines) and "after TTT" not in lines
    assert list(lines["artifact"].get_ydata()) == pytest.approx([2.025, 1.925])
    # ... and the two configurations named by the one field they differ in (not a hash, not the seed or data)
    assert {"train.max_seconds=20 (2 seeds)", "train.max_seconds=40 (2 seeds)"} <= set(lines)
    lo, hi = fig.axes[0].get_xlim()  # fitted to 1.12..1.14 MB, the 16 MB limit marked at the edge
    assert 1.10 < lo < 1.12 and 1.14 < hi < 1.16
    assert any("limit 16,000,000 B →" in t.get_text() for t in fig.axes[0].texts)
    assert fig.axes[0].get_legend().get_title().get_text() == ""  # no stage on fewer tokens here


def test_a_ttt_stage_on_fewer_tokens_is_drawn_apart(tmp_path):
    root = tmp_path / "runs"
    for s in (1, 2):
        staged_run(root, f"r_s{s}", s, 20, 2.0 + 0.01 * s, ttt_tokens=4096, total_bytes=15_950_000)
    df = load(root)
    pts = plots.config_points(df)
    assert pts.loc[0, "ttt_val_bpb_tokens"] == 4096 and bool(pts.loc[0, "ttt_val_bpb_fewer"])
    assert not pts.loc[0, "quant_val_bpb_fewer"] and pts.loc[0, "quant_val_bpb_tokens"] == 36_864
    fig = plots.bpb_vs_artifact_figure(df)
    lines = series(fig)
    hollow = lines["after TTT (fewer tokens)"]
    assert hollow.get_markerfacecolor() == "none" and "after TTT" not in lines
    assert lines["pre-quant"].get_markerfacecolor() != "none"
    assert fig.axes[0].get_legend().get_title().get_text() == plots.FEWER_NOTE
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert [list(ln.get_ydata()) for ln in dashed] == [pytest.approx([2.025, 1.985])]  # joined apart
    # the Pareto front ignores the fewer-token score: the best full-token stage is the pre-quant one
    assert list(lines["Pareto front"].get_ydata()) == pytest.approx([2.015])
    assert "limit 16,000,000 B" in lines  # in range (15.95 MB): drawn as a line


def test_config_labels(tmp_path):
    root = tmp_path / "runs"
    staged_run(root, "a_s1", 1, 20, 2.0)
    staged_run(root, "a_s2", 2, 20, 2.0)
    labels = registry.config_labels(load(root))
    assert list(labels.values()) == ["cpu-smoke"]  # one configuration: its preset
    staged_run(root, "b_s1", 1, 40, 2.0)
    assert sorted(registry.config_labels(load(root)).values()) == ["train.max_seconds=20", "train.max_seconds=40"]


def test_short_runs_get_markers_and_overlay(tmp_path):
    run = RunDir.create(tmp_path / "one")
    run.append_jsonl("metrics.jsonl", {"step": 4, "time_s": 1.0, "train_loss": 6.5})
    run.append_jsonl("metrics.jsonl", {"step": 4, "time_s": 1.2, "val_loss": 6.6, "val_bpb": 3.9})
    ax = plots.loss_curves_figure(run.path).axes[0]
    train = next(ln for ln in ax.get_lines() if ln.get_label() == "train")
    assert train.get_marker() == "o" and list(train.get_xdata()) == [4]  # one point, visible
    other = fake_run(tmp_path / "runs", "long", "cpu-smoke", 1, "k", 1.5, 10, steps=300)
    out = tmp_path / "fig"
    assert_written(plots.plot_loss_overlay({"one": run.path, "long": other.path}, out_dir=out), "compare_loss", out)


def test_precision_labels_are_numbered_beside_the_axes():
    prec = pd.DataFrame({"label": ["b8 k12.85 all", "b6 k12.85 all", "b5 k10 all"], "total_bytes": [20e6, 15.9e6, 13e6],
                         "val_bpb": [1.20, 1.21, 1.24]})
    ax = plots.precision_figure(prec).axes[0]
    texts = [t.get_text() for t in ax.texts]
    # the front in byte order, numbered on the points; the settings listed once, beside the axes
    assert texts[:3] == ["1", "2", "3"]
    assert texts[3] == "Pareto front\n1: b5 k10 all\n2: b6 k12.85 all\n3: b8 k12.85 all"


def test_figure_folder_is_checked_before_any_drawing(tmp_path, monkeypatch):
    """A figures folder that cannot be one (a file in the way) fails in one line naming figures_dir, before
    the figure is even built (issue: output paths validated before any work)."""
    blocker = tmp_path / "figures"
    blocker.write_text("not a folder")
    drawn = []
    monkeypatch.setattr(plots, "size_breakdown_figure", lambda *a, **k: drawn.append(1))
    with pytest.raises(PgolfError, match=r"figures_dir .*figures: exists and is not a directory"):
        plots.plot_size_breakdown({"a": {}}, out_dir=blocker)
    with pytest.raises(PgolfError, match="figures_dir"):
        plots.plot_size_breakdown({"a": {}}, out_dir=blocker / "sub")
    assert drawn == []
