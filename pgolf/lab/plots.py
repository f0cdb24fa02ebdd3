"""The standard figures, saved under `figures/` as PNG and SVG with stable names.

| function | file stem |
|---|---|
| `plot_loss_curves(run_dir)` | `loss_<run_id>` (train loss, val loss and val BPB against step) |
| `plot_bpb_vs_artifact(df)` | `bpb_vs_artifact` (seed means +- std per configuration, Pareto front, 16 MB line) |
| `plot_precision_vs_bytes(df)` | `gptq_precision_vs_bytes` (`quant.sweep` rows: BPB vs bytes, Pareto front, 16 MB) |
| `plot_ttt_convergence(df)` | `ttt_convergence` (`ttt.jsonl` rows: running BPB with TTT on and off, per phase) |
| `plot_size_breakdown(estimates)` | `architecture_bytes` (estimated artifact bytes by tensor kind, per config) |

Each returns the list of paths it wrote. Outside a Jupyter kernel the Agg backend is used, so the
functions work headless; inside one the figure is also shown inline.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pgolf.errors import PgolfError
from pgolf.runs import RunDir

if TYPE_CHECKING:
    import pandas

LIMIT_BYTES = 16_000_000
FORMATS = ("png", "svg")
# (metric, label, marker) of the three BPB stages a run can have (pgolf.lab.stats.metric_value).
STAGES = (("val_bpb_prequant", "pre-quant", "o"), ("quant_val_bpb", "quantised", "s"),
          ("ttt_val_bpb", "after TTT", "^"))


def _plt():
    import matplotlib

    if "ipykernel" not in sys.modules:  # headless: never try to open a window
        matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "pgolf"  # stable SVG element ids
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, name: str, out_dir: str | Path = "figures", formats: Sequence[str] = FORMATS) -> list[str]:
    """Write `fig` as `<out_dir>/<name>.<fmt>` for each format; close it unless in a kernel."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        # No date / software metadata, so an unchanged figure gives an unchanged file.
        meta = {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
        fig.savefig(p, format=fmt, dpi=120, bbox_inches="tight", metadata=meta)
        paths.append(str(p))
    if "ipykernel" not in sys.modules:
        _plt().close(fig)
    return paths


# ---- loss curves

def plot_loss_curves(run_dir: str | Path, out_dir: str | Path = "figures") -> list[str]:
    """Train/val loss and val BPB of one run from its `metrics.jsonl`."""
    run = RunDir(run_dir)
    rows = run.read_metrics()
    if not rows:
        raise PgolfError(f"{run.file('metrics.jsonl')}: no metrics to plot")
    plt = _plt()
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in rows if r.get("val_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), lw=1, label="train")
    if val:
        ax_loss.plot([v[0] for v in val], [v[1] for v in val], "o-", ms=3, label="val")
        bpb = [(v[0], v[2]) for v in val if v[2] is not None]
        if bpb:
            ax_bpb.plot(*zip(*bpb), "o-", ms=3, color="C1")
            ax_bpb.annotate(f"{bpb[-1][1]:.4f}", bpb[-1], textcoords="offset points", xytext=(-30, 8))
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=run.run_id)
    ax_loss.legend()
    ax_bpb.set(xlabel="step", ylabel="val BPB", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, f"loss_{run.run_id}", out_dir)


# ---- BPB against artifact bytes

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def config_points(df: "pandas.DataFrame", key: str = "config_key") -> "pandas.DataFrame":  # noqa: F821
    """Seed mean and std of each BPB stage and of the artifact bytes, per configuration."""
    import pandas as pd

    from pgolf.lab.stats import mean_std, metric_value

    rows = []
    if len(df) and "total_bytes" in df.columns and key in df.columns:
        for k, g in df[df["total_bytes"].notna()].groupby(key, sort=False):
            recs = g.to_dict("records")
            row = {key: k, "preset": recs[0].get("preset"), "n": len(g), "total_bytes": g["total_bytes"].mean()}
            for col, _, _ in STAGES:
                vals = [v for v in (metric_value(r, col) for r in recs) if v is not None]
                if vals:
                    m, sd = mean_std(vals)
                    row[col], row[col + "_std"] = m, sd or 0.0
            rows.append(row)
    return pd.DataFrame(rows)


def plot_bpb_vs_artifact(df: "pandas.DataFrame", out_dir: str | Path = "figures",  # noqa: F821
                         limit: int = LIMIT_BYTES, key: str = "config_key") -> list[str]:
    """Every configuration's BPB (pre-quant, quantised, after TTT) against its total artifact bytes."""
    pts = config_points(df, key)
    if pts.empty:
        raise PgolfError("no finished run with total_bytes to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    best = []  # the best (last) stage of each configuration: what would be submitted
    for _, r in pts.iterrows():
        best.append((r["total_bytes"], min(r[c] for c, _, _ in STAGES if c in r and r[c] == r[c])))
    for j, (col, label, marker) in enumerate(STAGES):
        if col not in pts.columns:
            continue
        sel = pts[pts[col].notna()]
        ax.errorbar(sel["total_bytes"], sel[col], yerr=sel[col + "_std"], fmt=marker, ms=5, capsize=3,
                    color=f"C{j}", label=label)
    for (x, y), (_, r) in zip(best, pts.iterrows()):
        ax.annotate(f"{r['preset']} ({r['n']})", (x, y), fontsize=7, textcoords="offset points", xytext=(4, -10))
    front = pareto_front(best)
    ax.plot([best[i][0] for i in front], [best[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.axvline(limit, color="red", lw=1, label=f"{limit:,} bytes")
    ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e6:.2f}M")
    ax.set(xlabel="total artifact bytes (model + code; M = 10^6)", ylabel="val BPB",
           title="BPB vs artifact size (seed mean +- std; label: preset (seeds))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, "bpb_vs_artifact", out_dir)


# ---- quantisation and TTT

def plot_precision_vs_bytes(df: "pandas.DataFrame", out_dir: str | Path = "figures",  # noqa: F821
                            name: str = "gptq_precision_vs_bytes", *, limit: int | None = None,
                            x: str = "total_bytes", y: str = "val_bpb", label: str = "label") -> list[str]:
    """BPB against bytes, one point per precision setting (`pgolf.quant.sweep` rows), with the Pareto
    front (labelled by the `label` column), the unquantised BPB (`df.attrs["prequant_bpb"]`) and the
    byte limit (`limit`, else `df.attrs["limit"]`, else 16,000,000); log x axis, so both show."""
    if df is None or len(df) == 0 or x not in df.columns or y not in df.columns:
        raise PgolfError(f"precision vs bytes: needs rows with columns {x!r} and {y!r}")
    limit = limit or df.attrs.get("limit") or LIMIT_BYTES
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.scatter(df[x], df[y], s=18, label="grid points")
    front = df.iloc[pareto_front(list(zip(df[x], df[y])))]
    ax.plot(front[x], front[y], "k--", lw=1, marker="o", ms=4, label="Pareto front")
    for _, r in front.iterrows():
        ax.annotate(str(r.get(label, "")), (r[x], r[y]), fontsize=6, textcoords="offset points", xytext=(3, 3))
    if df.attrs.get("prequant_bpb") is not None:
        ax.axhline(df.attrs["prequant_bpb"], color="gray", lw=1, ls=":", label="unquantised")
    ax.axvline(limit, color="red", lw=1, label=f"{limit:,} bytes")
    ax.set_xscale("log")
    ax.set(xlabel=f"{x.replace('_', ' ')} (log scale)", ylabel=y.replace("_", " "), title="GPTQ precision vs bytes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, name, out_dir)


TTT_COLUMNS = ("run", "eval_id", "method", "kind", "phase", "tokens", "bytes", "bpb")


def plot_ttt_convergence(df: "pandas.DataFrame", out_dir: str | Path = "figures",  # noqa: F821
                         name: str = "ttt_convergence") -> list[str]:
    """Rows of `ttt.jsonl` (`pgolf.lab.registry.read_convergence`). Left: running BPB against tokens
    scored, TTT on (solid) and off (dashed, `bpb_no_ttt`) per run, phase boundaries dotted.
    Right: BPB of the tokens scored within each phase, on and off."""
    if df is None or df.empty:
        raise PgolfError("ttt convergence: no ttt.jsonl rows to plot (run `pgolf eval RUN --ttt` first)")
    missing = [c for c in TTT_COLUMNS if c not in df.columns]
    if missing:
        raise PgolfError(f"ttt convergence: rows lack column(s) {', '.join(missing)} (read them with read_convergence)")
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, ((run, _eid), g) in enumerate(df.groupby(["run", "eval_id"], sort=False)):
        color = f"C{i % 10}"
        b = g[g["kind"].isin(["batch", "chunk"])].sort_values("tokens")
        label = f"{run} ({g['method'].iloc[0]})"
        ax.plot(b["tokens"], b["bpb"], color=color, lw=1.3, marker=".", ms=3, label=f"{label} TTT")
        if "bpb_no_ttt" in b:
            ax.plot(b["tokens"], b["bpb_no_ttt"], color=color, lw=1.0, ls="--", label=f"{label} no TTT")
        for t in g.loc[g["kind"] == "phase", "tokens"]:
            ax.axvline(t, color=color, ls=":", lw=0.8)
        seg = _per_phase(b)
        bx.plot(seg["phase"], seg["bpb"], "o-", color=color, label=f"{label} TTT")
        if "bpb_no_ttt" in seg:
            bx.plot(seg["phase"], seg["bpb_no_ttt"], "s--", color=color, label=f"{label} no TTT")
    ax.set(xlabel="tokens scored", ylabel="running BPB", title="TTT convergence")
    bx.set(xlabel="phase (global SGD rounds before these tokens)", ylabel="BPB of the tokens scored in it",
           title="per phase")
    bx.xaxis.get_major_locator().set_params(integer=True)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, name, out_dir)


def _per_phase(b: "pandas.DataFrame") -> "pandas.DataFrame":  # noqa: F821
    """BPB of the tokens scored within each phase, from the running sums of consecutive batch rows."""
    import pandas as pd

    b = b.sort_values("tokens")
    rows = []
    prev = {"bytes": 0, "loss": 0.0, "base": 0.0}
    for phase, g in b.groupby("phase", sort=True):
        last = g.iloc[-1]
        loss = last["bpb"] * math.log(2) * last["bytes"]
        nb = last["bytes"] - prev["bytes"]
        row = {"phase": phase, "bpb": (loss - prev["loss"]) / (math.log(2) * nb) if nb else float("nan")}
        base = None
        if "bpb_no_ttt" in g and last.get("bpb_no_ttt") is not None:
            base = last["bpb_no_ttt"] * math.log(2) * last["bytes"]
            row["bpb_no_ttt"] = (base - prev["base"]) / (math.log(2) * nb) if nb else float("nan")
        rows.append(row)
        prev = {"bytes": last["bytes"], "loss": loss, "base": base or 0.0}
    return pd.DataFrame(rows)


# ---- architecture estimates

def plot_size_breakdown(estimates: dict[str, dict[str, Any]], out_dir: str | Path = "figures",
                        limit: int = LIMIT_BYTES, name: str = "architecture_bytes") -> list[str]:
    """Stacked bars of `workbench.estimate(...)["bytes_by_kind"]` (+ code) for each labelled config."""
    if not estimates:
        raise PgolfError("size breakdown: no estimates to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(estimates), 4.5))
    labels = list(estimates)
    kinds = sorted({k for e in estimates.values() for k in e["bytes_by_kind"]}) + ["code"]
    bottom = [0.0] * len(labels)
    for j, kind in enumerate(kinds):
        vals = [float(estimates[lb]["code_bytes"] if kind == "code" else estimates[lb]["bytes_by_kind"].get(kind, 0))
                for lb in labels]
        ax.bar(labels, vals, bottom=bottom, color=f"C{j}", label=kind)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, lb in enumerate(labels):
        ax.annotate(f"{estimates[lb]['params']:,} params", (i, bottom[i]), ha="center", fontsize=7,
                    textcoords="offset points", xytext=(0, 3))
    if max(bottom) > 0.5 * limit:
        ax.axhline(limit, color="red", lw=1, label=f"{limit:,} bytes")
    ax.set(ylabel="estimated artifact bytes", title="artifact estimate by tensor kind")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save(fig, name, out_dir)
