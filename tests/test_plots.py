"""pgolf.lab.plots: every standard figure is written as PNG and SVG under a stable name."""
from pathlib import Path

import pandas as pd
import pytest

from pgolf.lab import plots
from pgolf.errors import PgolfError
from pgolf.lab.registry import load
from pgolf.runs import RunDir


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
