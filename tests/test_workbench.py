"""The helpers behind the notebooks' widgets: the preset -> tweak table, the size figure that follows the
controls, the estimate line and its verdict, short trials (train both, a grid of widths) and the live view
of a training run."""
import json
import re
from pathlib import Path

import pytest

from pgolf.errors import PgolfError
from pgolf.lab import launch, live, trials, workbench
from pgolf.presets import get_preset

TINY = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
        "train.train_batch_tokens=2048", "train.val_batch_tokens=4096", "data.val_max_tokens=4096",
        "train.iterations=3", "train.log_every=1"]


def est(params, by_kind, code=1000, low=None, high=None, limit=16_000_000):
    """An `estimate` dict with hand-chosen numbers."""
    total = sum(by_kind.values()) + code
    low, high = low if low is not None else total - 10, high if high is not None else total + 10
    return {"preset": "p", "params": params, "est_model_bytes": total - code, "code_bytes": code, "bytes": total,
            "est_artifact_bytes": total, "bytes_low": low, "bytes_high": high, "limit": limit,
            "over_limit": low > limit, "maybe_over": low <= limit < high, "under_limit": high <= limit,
            "bytes_by_kind": by_kind}


def test_delta_table_by_hand():
    base = est(1000, {"mlp": 5000, "attn": 2000})
    tweak = est(1250, {"mlp": 5000, "attn": 2000, "gate": 300})
    d = workbench.deltas(base, tweak)
    assert d["params"] == (1000, 1250, 250)
    assert d["est. artifact bytes"] == (8000, 8300, 300)
    assert d["  gate bytes"] == (0, 300, 300) and d["  mlp bytes"] == (5000, 5000, 0)
    table = workbench.delta_table(base, tweak, "cpu-smoke")
    assert list(table.columns) == ["cpu-smoke", "tweak", "Δ", "Δ %"]  # headed by what each column shows
    assert table.loc["params"].tolist() == ["1,000", "1,250", "+250", "+25.0%"]
    assert table.loc["  gate bytes", "Δ"] == "+300" and table.loc["  mlp bytes", "Δ"] == "0"
    assert table.loc["vs 16,000,000"].tolist()[:2] == ["under", "under"]


def test_verdict_follows_the_band():
    # "over" only when the whole band is over the limit
    assert workbench.verdict(est(1, {"mlp": 15_999_000}, code=0, low=15_900_000, high=16_100_000)) == "maybe over"
    assert workbench.verdict(est(1, {"mlp": 16_050_000}, code=0, low=16_000_001, high=16_200_000)) == "over"
    assert workbench.verdict(est(1, {"mlp": 15_000_000}, code=0, low=14_900_000, high=16_000_000)) == "under"
    line = workbench.estimate_html(est(1, {"mlp": 15_999_000}, code=0, low=15_900_000, high=16_100_000))
    assert "band 15,900,000 – 16,100,000" in line and "maybe over 16,000,000" in line


def bars(fig):
    """{bar label: {tensor group: bar width}} of a size breakdown figure."""
    ax = fig.axes[0]
    groups = [t.get_text() for t in ax.get_yticklabels()]
    return {c.get_label(): dict(zip(groups, (p.get_width() for p in c.patches))) for c in ax.containers}


def test_widget_redraws_table_figure_and_line_on_a_change():
    w = workbench.tweak_widget("cpu-smoke", ["model.num_layers=4"])
    by_name = {c.description: c for c in w.kwargs_widgets}
    assert set(by_name) == set(workbench.TWEAKS)  # the browser test's hooks
    assert all(f"pgolf-control-{n}" in c._dom_classes for n, c in by_name.items())
    assert by_name["model_dim"].layout.width == workbench.SLIDER_WIDTH  # sized for 64..1024
    new = workbench.set_widget_values(w, attn_gate="sparse", attn_gate_width=24)
    headless = workbench.estimate(workbench.tweaked("cpu-smoke", ["model.num_layers=4"], attn_gate="sparse",
                                                    attn_gate_width=24))
    base = workbench.estimate(get_preset("cpu-smoke", ["model.num_layers=4"]))
    assert new == headless and new["bytes_by_kind"]["gate"] > 0 == base["bytes_by_kind"].get("gate", 0)
    drawn = bars(w.view["figure"])
    tweak = next(v for k, v in drawn.items() if k.startswith("tweak"))
    assert tweak["gate"] == new["bytes_by_kind"]["gate"] and tweak["total"] == new["bytes"]
    assert tweak["code"] == new["code_bytes"]
    assert w.view["table"].loc["params", "Δ"] == f"{new['params'] - base['params']:+,}"
    m = re.search(r'class="pgolf-params">(\d+)</span>.*class="pgolf-bytes">(\d+)</span>', w.children[-1].value)
    assert (int(m.group(1)), int(m.group(2))) == (new["params"], new["est_artifact_bytes"])
    workbench.set_widget_values(w, attn_gate_width=8)  # the figure follows again
    assert next(v for k, v in bars(w.view["figure"]).items() if k.startswith("tweak"))["gate"] < tweak["gate"]
    bad = workbench.set_widget_values(w, num_loops=2, loop_start=3, loop_end=1)
    assert "error" in bad and "pgolf-invalid" in w.children[-1].value


# ---- trials

def test_compare_launches_each_config_and_tabulates_deltas(tmp_path, monkeypatch):
    calls = []

    def fake_train(preset, data, **kw):
        calls.append((preset, data, kw))
        kw["watch"]("12:00:00 training: 1,000 params, batch ...")  # the progress line follows the log
        bpb, size = (5.0, 1000) if not kw["overrides"] else (4.5, 1200)
        return {"run_dir": kw["out"], "params": 1, "steps": 2, "train_seconds": 3.0, "val_loss": 4.0, "val_bpb": bpb,
                "total_bytes": size}

    monkeypatch.setattr(launch, "train", fake_train)
    base = get_preset("cpu-smoke")
    table = trials.compare({"base": base, "gate": workbench.tweaked("cpu-smoke", attn_gate="sparse")}, 7.0,
                           "DATA", runs_root=tmp_path, progress=True)
    assert table["label"].tolist() == ["base", "gate"] and table["val_bpb"].tolist() == [5.0, 4.5]
    assert table["Δ val_bpb"].tolist() == [0.0, -0.5] and table["Δ total_bytes"].tolist() == [0, 200]
    assert [c[2]["overrides"] for c in calls] == [[], ['model.attn_gate="sparse"']]
    assert all(c[0] == "cpu-smoke" and c[1] == "DATA" and c[2]["max_seconds"] == 7.0 for c in calls)
    assert all(Path(c[2]["out"]).parent == tmp_path for c in calls)


def test_data_ready_says_what_to_run_first(tmp_path):
    assert "make run" in trials.data_ready(tmp_path / "data" / "sample")
    (tmp_path / "fineweb_val_000000.bin").write_bytes(b"")
    assert trials.data_ready(tmp_path) == ""
    assert trials.parse_values("8, 12;16 ,") == [8, 12, 16]
    with pytest.raises(PgolfError, match="unknown tweak"):
        trials.grid("cpu-smoke", [], "width", [1], 1.0, "d")


@pytest.mark.slow
def test_grid_trains_each_width_and_plots_bpb_and_bytes(tmp_path, sp1024_data, monkeypatch):
    """The grid mode on a tiny CPU config: two gate widths, trained for real (3 steps each)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table = trials.grid("cpu-smoke", TINY, "attn_gate_width", [4, 16], 30.0, str(sp1024_data),
                        base_values={"attn_gate": "sparse"}, runs_root=tmp_path / "runs")
    assert table["attn_gate_width"].tolist() == [4, 16] and table["steps"].tolist() == [3, 3]
    assert table["params"].iloc[1] - table["params"].iloc[0] == 2 * 2 * 12  # 2 layers x 2 heads x 12 more inputs
    assert table["total_bytes"].notna().all() and table["val_bpb"].notna().all()
    for r in table.to_dict("records"):
        assert json.loads((Path(r["run_dir"]) / "result.json").read_text())["val_bpb"] == r["val_bpb"]
        assert r["est_bytes_low"] <= r["est_bytes"] <= r["est_bytes_high"]
    from pgolf.lab import plots

    out = tmp_path / "fig"
    paths = plots.plot_grid(table, "attn_gate_width", out_dir=out)
    assert [Path(p).name for p in paths] == ["grid_attn_gate_width.png", "grid_attn_gate_width.svg"]
    fig = plots.grid_figure(table, "attn_gate_width")
    (bpb_line,), lines = fig.axes[0].get_lines(), fig.axes[1].get_lines()
    assert list(bpb_line.get_xdata()) == [4, 16] and list(bpb_line.get_ydata()) == table["val_bpb"].tolist()
    measured = next(ln for ln in lines if ln.get_label() == "artifact (measured)")
    assert list(measured.get_ydata() * 1e6) == pytest.approx(table["total_bytes"].tolist())


# ---- the live view of a run

def test_follow_phases_status_and_throttle(tmp_path):
    now = [0.0]
    f = live.Follow(tmp_path, label="r", budget_seconds=20, interval=0.5, show=False, clock=lambda: now[0])
    metrics = tmp_path / "metrics.jsonl"
    log = ["pgolf train: preset cpu-smoke", "training: 1,234 params, batch 2048 tokens", "step 1 loss 7.0",
           "step 2 val_loss 6.9 val_bpb 4.1 (0.1s)",  # a periodic validation: still training
           "step 2 loss 6.8", "stopped at step 2 after 1.0s of training", "step 2 val_loss 6.7 val_bpb 4.0 (0.2s)",
           "artifact final_model.int8.ptz: ...", "finished: val_bpb 4.0000"]
    rows = [{"step": 1, "time_s": 0.5, "train_loss": 7.0}, {"step": 2, "time_s": 1.0, "val_loss": 6.9},
            {"step": 2, "time_s": 1.0, "train_loss": 6.8}]
    seen = []
    for i, line in enumerate(log):
        now[0] = 0.1 * i
        if i in (2, 3, 4):
            with open(metrics, "a") as fh:
                fh.write(json.dumps(rows[i - 2]) + "\n")
        f(line)
        seen.append(f.phase)
        if i == 4:
            assert f.status() == "r · training · step 2 · 1/20 s of training · loss 6.8000 · val loss 6.9000"
    assert seen == ["starting", "training", "training", "training", "training", "validation",
                    "export / quantisation", "export / quantisation", "finished"]
    assert f.draws == 5  # the first line, a redraw after 0.5 s, and each of the three phase changes after it
    f.finish({"steps": 2, "val_bpb": 4.0, "total_bytes": 1234})
    assert f.status() == "r · finished · 2 steps · val BPB 4.0000 · artifact 1,234 B"
    assert f.timeline() == "starting 0.1 s · training 0.4 s · validation 0.1 s · export / quantisation 0.2 s"
    ax = f.figure().axes[0]
    train = next(ln for ln in ax.get_lines() if ln.get_label() == "train loss")
    assert train.get_marker() == "o" and list(train.get_xdata()) == [1, 2]  # few points: markers


def test_follow_records_a_failure(tmp_path):
    f = live.Follow(tmp_path, label="r", show=False)
    f("training: 10 params, ...")
    f.finish(error="pgolf: error: step 3: training loss is nan (diverged)\nlast lines: ...")
    assert f.phase == "failed" and f.status() == "r · failed · pgolf: error: step 3: training loss is nan (diverged)"


def fake_trainer(calls):
    """A stand-in for `launch.train` that writes a short metrics.jsonl and returns a result, as a run does."""
    def train(preset=None, data=None, **kw):
        out = Path(kw["out"])
        out.mkdir(parents=True)
        for step in (1, 2, 3):
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "time_s": step * 0.1, "train_loss": 7.0 - 0.1 * step}) + "\n")
        calls.append(kw["overrides"])
        return {"run_dir": str(out), "params": 100 + len(calls), "steps": 3, "train_seconds": 0.3, "val_loss": 6.0,
                "val_bpb": 3.0 - 0.01 * len(calls), "total_bytes": 1000 * len(calls)}
    return train


def test_the_train_both_and_grid_buttons(tmp_path, monkeypatch):
    """The widgets' buttons: a click trains (here a stand-in) and draws the overlay / the grid figure."""
    calls = []
    monkeypatch.setattr(launch, "train", fake_trainer(calls))
    data, figs = tmp_path / "data", tmp_path / "fig"
    data.mkdir()
    controls = workbench.tweak_widget("cpu-smoke", figure=False)
    workbench.set_widget_values(controls, attn_gate="sparse", attn_gate_width=16)
    both = trials.compare_widget(controls, "cpu-smoke", [], str(data), runs_root=tmp_path / "runs", figures_dir=figs)
    both.manual_button.click()
    assert calls == [] and not figs.exists()  # no data folder yet: a message, nothing trained
    (data / "fineweb_val_000000.bin").write_bytes(b"")
    both.manual_button.click()
    assert calls == [[], ['model.attn_gate="sparse"', "model.attn_gate_width=16"]]
    assert (figs / "compare_loss.png").is_file()
    grid = trials.grid_widget(controls, "cpu-smoke", [], str(data), runs_root=tmp_path / "runs", figures_dir=figs,
                              values="8, 24")
    grid.manual_button.click()
    assert calls[2:] == [['model.attn_gate="sparse"', "model.attn_gate_width=8"],
                         ['model.attn_gate="sparse"', "model.attn_gate_width=24"]]
    assert (figs / "grid_attn_gate_width.png").is_file()


def test_notebook_parameters_fail_early_with_the_key_named(tmp_path):
    """What the notebooks take from papermill: a config value set directly on the preset (train.ipynb's
    max_seconds) is checked when the config is written, before any run folder exists; `overrides` given as
    one string is refused rather than read character by character; the grid widget names a tweak it cannot
    grid over."""
    cfg = get_preset("cpu-smoke")
    cfg.train.max_seconds = -5.0
    with pytest.raises(PgolfError, match=r"train.max_seconds: -5.0: expected >= 0"):
        workbench.write_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = get_preset("cpu-smoke")
    cfg.model.num_heads = 3  # model_dim 128 is not a multiple of 3 heads
    with pytest.raises(PgolfError, match="model.num_heads"):
        workbench.write_config(cfg, tmp_path / "run")
    with pytest.raises(PgolfError, match="expected a list of key=value strings, not one string"):
        get_preset("cpu-smoke", "model.num_layers=2")  # type: ignore[arg-type]
    controls = workbench.tweak_widget("cpu-smoke", [])
    with pytest.raises(PgolfError, match=r"grid tweak 'attn_gate': expected a numeric tweak \(attn_gate_width"):
        trials.grid_widget(controls, "cpu-smoke", [], str(tmp_path), tweak="attn_gate")
