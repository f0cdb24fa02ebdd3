"""The standard figures, saved under `figures/` as PNG and SVG with stable names.

| function | file stem |
|---|---|
| `plot_loss_curves(run_dir)` | `loss_<run_id>` (train loss, val loss and val BPB against step) |
| `plot_loss_overlay({label: run_dir})` | `compare_loss` (the losses of several runs on one axes) |
| `plot_bpb_vs_artifact(df)` | `bpb_vs_artifact` (every stage of every configuration against its bytes) |
| `plot_precision_vs_bytes(df)` | `gptq_precision_vs_bytes` (`quant.sweep` rows: BPB vs bytes, Pareto front, 16 MB) |
| `plot_ttt_convergence(df)` | `ttt_convergence` (`ttt.jsonl` rows: running BPB with TTT on and off, per phase) |
| `plot_size_breakdown(estimates)` | `architecture_bytes` (estimated artifact bytes by tensor group, per config) |
| `plot_grid(df, x)` | `grid_<x>` (`trials.grid`: a tweak's values against val BPB and artifact bytes) |

Each returns the list of paths it wrote, and checks its `out_dir` before drawing anything (a file in
the way, or a folder that cannot be written, is one `pgolf: error:` line naming `figures_dir`).
Figures are `matplotlib.figure.Figure` objects, never pyplot's: nothing is left open in a kernel, no
backend is chosen, and a widget callback (where the inline backend draws nothing) shows the same
picture as a cell: in a Jupyter kernel `save` displays the PNG it wrote.
"""
from __future__ import annotations

import functools
import inspect
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pgolf.errors import PgolfError
from pgolf.fileio import check_output
from pgolf.runs import RunDir

if TYPE_CHECKING:
    import pandas

LIMIT_BYTES = 16_000_000
FORMATS = ("png", "svg")
FEW_POINTS = 40  # curves with at most this many points are drawn with markers (a short run is visible)
# (metric, stage label, marker) of the three BPB stages a run can have (pgolf.lab.stats.STAGE_OF).
STAGES = (("val_bpb_prequant", "pre-quant", "o"), ("quant_val_bpb", "artifact", "s"),
          ("ttt_val_bpb", "after TTT", "^"))
FEWER_NOTE = "hollow, dashed: scored on fewer tokens\nthan the configuration's other stages"


def checks_out_dir(plot: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """A `plot_*` function whose `out_dir` is validated before any work (issue: nothing lost)."""
    sig = inspect.signature(plot)

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> list[str]:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        check_output(bound.arguments["out_dir"], "figures_dir", kind="dir")
        return plot(*args, **kwargs)
    return wrapper


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where figures and live views are displayed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def new_figure(width: float, height: float) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.hashsalt"] = "pgolf"  # stable SVG element ids
    return Figure(figsize=(width, height))


def png_bytes(fig: Any, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def save(fig: Any, name: str, out_dir: str | Path = "figures", formats: Sequence[str] = FORMATS,
         show: bool | None = None) -> list[str]:
    """Write `fig` as `<out_dir>/<name>.<fmt>` for each format; in a kernel (or `show`), display the PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        # No date / software metadata, so an unchanged figure gives an unchanged file.
        meta = {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
        fig.savefig(p, format=fmt, dpi=120, bbox_inches="tight", metadata=meta)
        paths.append(str(p))
    if (in_kernel() if show is None else show) and "png" in formats:
        from IPython.display import Image, display

        display(Image(filename=str(out / f"{name}.png")))
    return paths


def curve(ax: Any, xs: Sequence[float], ys: Sequence[float], **kw: Any) -> Any:
    """A line, with markers when it has few points (one point of a line alone would not be drawn)."""
    n = len(xs)
    if n <= FEW_POINTS:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 5 if n <= 3 else 3)
    return ax.plot(xs, ys, lw=1.2, **kw)[0]


def limit_mark(ax: Any, limit: float, scale: float = 1.0, axis: str = "x") -> None:
    """The byte limit as a line when it lies in the axis range, else an arrow at the edge it lies beyond."""
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    v = limit / scale
    text = f"limit {limit:,.0f} B"
    if lo <= v <= hi:
        (ax.axvline if axis == "x" else ax.axhline)(v, color="red", lw=1, label=text)
        return
    right = v > hi
    where = (0.99 if right else 0.01, 0.97) if axis == "x" else (0.99, 0.97 if right else 0.03)
    arrow = "→" if axis == "x" and right else "←" if axis == "x" else "↑" if right else "↓"
    ax.annotate(f"{text} {arrow}", xy=where, xycoords="axes fraction", ha="right" if right or axis == "y" else "left",
                va="top" if right or axis == "x" else "bottom", fontsize=8, color="red")


# ---- loss curves

def _losses(run_dir: str | Path) -> tuple[RunDir, list[tuple[int, float]], list[tuple[int, float, Any]]]:
    run = RunDir(run_dir)
    rows = run.read_metrics()
    if not rows:
        raise PgolfError(f"{run.file('metrics.jsonl')}: no metrics to plot")
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in rows if r.get("val_loss") is not None]
    return run, train, val


@checks_out_dir
def plot_loss_curves(run_dir: str | Path, out_dir: str | Path = "figures") -> list[str]:
    """Train/val loss and val BPB of one run from its `metrics.jsonl` (`loss_curves_figure`)."""
    return save(loss_curves_figure(run_dir), f"loss_{RunDir(run_dir).run_id}", out_dir)


def loss_curves_figure(run_dir: str | Path) -> Any:
    run, train, val = _losses(run_dir)
    fig = new_figure(10, 3.8)
    ax_loss, ax_bpb = fig.subplots(1, 2)
    if train:
        curve(ax_loss, *zip(*train), label="train")
    if val:
        ax_loss.plot([v[0] for v in val], [v[1] for v in val], "s-", ms=4, label="val")
        bpb = [(v[0], v[2]) for v in val if v[2] is not None]
        if bpb:
            ax_bpb.plot(*zip(*bpb), "o-", ms=4, color="C1")
            ax_bpb.annotate(f"{bpb[-1][1]:.4f}", bpb[-1], textcoords="offset points", xytext=(-30, 8))
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=run.run_id)
    ax_loss.legend()
    ax_bpb.set(xlabel="step", ylabel="val BPB", title="validation bits per byte")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@checks_out_dir
def plot_loss_overlay(runs: dict[str, str | Path], out_dir: str | Path = "figures",
                      name: str = "compare_loss") -> list[str]:
    """The train loss (lines) and val loss (squares) of several runs, one colour each, on one axes."""
    if not runs:
        raise PgolfError("loss overlay: no runs given")
    fig = new_figure(8, 4)
    ax = fig.subplots()
    for i, (label, run_dir) in enumerate(runs.items()):
        _, train, val = _losses(run_dir)
        if train:
            curve(ax, *zip(*train), color=f"C{i}", label=f"{label} train")
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], "s", ms=5, color=f"C{i}", label=f"{label} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="same data, seed and time budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, name, out_dir)


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
    """Per configuration: seed mean and std of each BPB stage and of the artifact bytes, the tokens each
    stage was scored on (`<metric>_tokens`, the smallest over seeds) and `<metric>_fewer`: True when that
    stage was scored on fewer tokens than another stage of the same run (pgolf.runs stages)."""
    import pandas as pd

    from pgolf.lab.stats import mean_std, metric_tokens, metric_value

    rows = []
    if len(df) and "total_bytes" in df.columns and key in df.columns:
        for k, g in df[df["total_bytes"].notna()].groupby(key, sort=False):
            recs = g.to_dict("records")
            row = {key: k, "preset": recs[0].get("preset"), "n": len(g), "total_bytes": g["total_bytes"].mean()}
            # per run, {stage metric: tokens it was scored on}, for the stages whose count is known
            known = [{c: n for c, _, _ in STAGES if metric_value(r, c) is not None and (n := metric_tokens(r, c))}
                     for r in recs]
            for col, _, _ in STAGES:
                vals = [v for v in (metric_value(r, col) for r in recs) if v is not None]
                if not vals:
                    continue
                m, sd = mean_std(vals)
                counts = [t[col] for t in known if col in t]
                fewer = any(col in t and t[col] < max(t.values()) for t in known)
                row.update({col: m, col + "_std": sd or 0.0, col + "_tokens": min(counts) if counts else None,
                            col + "_fewer": fewer})
            rows.append(row)
    return pd.DataFrame(rows)


def bpb_vs_artifact_figure(df: "pandas.DataFrame", limit: int = LIMIT_BYTES, key: str = "config_key",  # noqa: F821
                           labels: dict[str, str] | None = None) -> Any:
    """The figure of `plot_bpb_vs_artifact`: one series per stage (marker), each configuration's stages
    joined by a line of its colour and named in the legend by how it differs from the others
    (`registry.config_labels`); stages on fewer tokens hollow and joined dashed."""
    from pgolf.lab.registry import config_labels

    pts = config_points(df, key)
    if pts.empty:
        raise PgolfError("no finished run with total_bytes to plot")
    labels = labels if labels is not None else config_labels(df, key)
    fig = new_figure(9, 5.2)
    ax = fig.subplots()
    mb = pts["total_bytes"] / 1e6
    best = []  # per configuration, its best stage scored on the full token count: what would be submitted
    for i, r in pts.iterrows():
        color = f"C{i % 10}"
        have = [(c, r[c], bool(r.get(c + "_fewer"))) for c, _, _ in STAGES if c in r and r[c] == r[c]]
        full = [y for _, y, fewer in have if not fewer]
        best.append((r["total_bytes"], min(full) if full else float("nan")))
        name = labels.get(str(r[key]), str(r["preset"]))
        ax.plot([mb[i]] * len(full), full, "-", color=color, lw=3, alpha=0.6, zorder=1,
                label=f"{name} ({r['n']} seed{'s' if r['n'] > 1 else ''})")
        for _, y, fewer in have:
            if fewer and full:  # joined to the last full-token stage, dashed
                ax.plot([mb[i], mb[i]], [full[-1], y], "--", color=color, lw=1.5, zorder=1)
    any_fewer = False
    for col, label, marker in STAGES:
        if col not in pts.columns:
            continue
        fewer = pts[col + "_fewer"].apply(lambda v: bool(v) if v == v else False)  # NaN: not scored
        for sel, hollow in ((pts[pts[col].notna() & ~fewer], False), (pts[pts[col].notna() & fewer], True)):
            if sel.empty:
                continue
            any_fewer |= hollow
            x = sel["total_bytes"] / 1e6
            ax.errorbar(x, sel[col], yerr=sel[col + "_std"], fmt="none", ecolor="0.4", capsize=3, lw=0.8)
            ax.plot(x, sel[col], marker, ms=7, ls="none", color="k", mfc="none" if hollow else "k",
                    label=f"{label} (fewer tokens)" if hollow else label)
    front = [i for i in pareto_front(best) if best[i][1] == best[i][1]]
    ax.plot([best[i][0] / 1e6 for i in front], [best[i][1] for i in front], ":", color="0.3", lw=1,
            label="Pareto front")
    # Fitted to the data; stretched to the limit when it lies within one data span of it (near the cap).
    span, cap = max(mb.max() - mb.min(), 0.02 * mb.max()), limit / 1e6
    lo, hi = mb.min() - 0.1 * span, mb.max() + 0.1 * span
    lo, hi = (cap - 0.1 * span if mb.min() - span <= cap < lo else lo), (cap + 0.1 * span if hi < cap <= mb.max() + span
                                                                       else hi)
    ax.set_xlim(lo, hi)
    limit_mark(ax, limit, scale=1e6)
    ax.set(xlabel="total artifact bytes, model + code (MB = 10^6 B)", ylabel="val BPB",
           title="BPB vs artifact size (seed mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title=FEWER_NOTE if any_fewer else None, title_fontsize=7)
    fig.tight_layout()
    return fig


@checks_out_dir
def plot_bpb_vs_artifact(df: "pandas.DataFrame", out_dir: str | Path = "figures",  # noqa: F821
                         limit: int = LIMIT_BYTES, key: str = "config_key") -> list[str]:
    """Every configuration's BPB at each stage (pre-quant, artifact, after TTT) against its total artifact
    bytes (`bpb_vs_artifact_figure`), saved as `bpb_vs_artifact`."""
    return save(bpb_vs_artifact_figure(df, limit, key), "bpb_vs_artifact", out_dir)


# ---- quantisation and TTT

@checks_out_dir
def plot_precision_vs_bytes(df: "pandas.DataFrame", out_dir: str | Path = "figures",  # noqa: F821
                            name: str = "gptq_precision_vs_bytes", *, limit: int | None = None,
                            x: str = "total_bytes", y: str = "val_bpb", label: str = "label") -> list[str]:
    """BPB against bytes, one point per precision setting (`pgolf.quant.sweep` rows), with the Pareto
    front (labelled by the `label` column), the unquantised BPB (`df.attrs["prequant_bpb"]`) and the
    byte limit (`limit`, else `df.attrs["limit"]`, else 16,000,000); log x axis, so both show."""
    return save(precision_figure(df, limit=limit, x=x, y=y, label=label), name, out_dir)


def precision_figure(df: "pandas.DataFrame", *, limit: int | None = None, x: str = "total_bytes",  # noqa: F821
                     y: str = "val_bpb", label: str = "label") -> Any:
    if df is None or len(df) == 0 or x not in df.columns or y not in df.columns:
        raise PgolfError(f"precision vs bytes: needs rows with columns {x!r} and {y!r}")
    limit = limit or df.attrs.get("limit") or LIMIT_BYTES
    fig = new_figure(9, 4.5)
    ax = fig.subplots()
    ax.scatter(df[x], df[y], s=18, label="grid points")
    front = df.iloc[pareto_front(list(zip(df[x], df[y])))]
    ax.plot(front[x], front[y], "k--", lw=1, marker="o", ms=4, label="Pareto front")
    # Numbers on the points and their settings listed beside the axes: long labels would overlap.
    for n, (_, r) in enumerate(front.iterrows(), 1):
        ax.annotate(str(n), (r[x], r[y]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    key = "\n".join(f"{n}: {r.get(label, '')}" for n, (_, r) in enumerate(front.iterrows(), 1))
    ax.text(1.02, 0.0, "Pareto front\n" + key, transform=ax.transAxes, fontsize=7, va="bottom", family="monospace")
    if df.attrs.get("prequant_bpb") is not None:
        ax.axhline(df.attrs["prequant_bpb"], color="gray", lw=1, ls=":", label="unquantised")
    ax.set_xscale("log")
    limit_mark(ax, limit)
    ax.set(xlabel=f"{x.replace('_', ' ')} (log scale)", ylabel=y.replace("_", " "), title="GPTQ precision vs bytes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


TTT_COLUMNS = ("run", "eval_id", "method", "kind", "phase", "tokens", "bytes", "bpb")


@checks_out_dir
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
    fig = new_figure(12, 4.5)
    ax, bx = fig.subplots(1, 2)
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

def size_breakdown_figure(estimates: dict[str, dict[str, Any]], limit: int = LIMIT_BYTES) -> Any:
    """Horizontal bars, one group per tensor kind (`workbench.estimate(...)["bytes_by_kind"]`), code and the
    total, one bar per labelled configuration, on a log axis: a 2 kB gate reads as well as a 10 MB MLP.
    Each bar container is labelled with its configuration (for tests and legends)."""
    if not estimates:
        raise PgolfError("size breakdown: no estimates to plot")
    labels = list(estimates)
    kinds = sorted({k for e in estimates.values() for k in e["bytes_by_kind"]})
    groups = [*kinds, "code", "total"]
    fig = new_figure(8.5, 0.9 + 0.32 * len(groups) * max(len(labels), 1.5))
    ax = fig.subplots()
    h = 0.8 / len(labels)
    every = [v for e in estimates.values() for v in (*e["bytes_by_kind"].values(), e["code_bytes"]) if v > 0]
    smallest, largest = min(every, default=1) / 5, max(every, default=1)  # a zero bar is left out, labelled "0 B"
    for i, lb in enumerate(labels):
        e = estimates[lb]
        vals = [float(e["bytes_by_kind"].get(k, 0)) for k in kinds] + [float(e["code_bytes"])]
        vals.append(float(e.get("bytes", sum(vals))))
        ys = [g + (i - (len(labels) - 1) / 2) * h for g in range(len(groups))]
        ax.barh(ys, vals, height=h, color=f"C{i}", label=f"{lb} ({e['params']:,} params)")
        for y, v in zip(ys, vals):
            ax.annotate(_bytes_text(v), (max(v, smallest), y), textcoords="offset points", xytext=(3, 0),
                        va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_yticks(range(len(groups)), groups)
    ax.invert_yaxis()
    ax.set_xlim(smallest, max(limit, largest) * 4)
    limit_mark(ax, limit)
    ax.set(xlabel="estimated bytes (log scale)", title="artifact estimate by tensor group")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _bytes_text(v: float) -> str:
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB" if v >= 1e3 else f"{v:.0f} B"


@checks_out_dir
def plot_size_breakdown(estimates: dict[str, dict[str, Any]], out_dir: str | Path = "figures",
                        limit: int = LIMIT_BYTES, name: str = "architecture_bytes") -> list[str]:
    """`size_breakdown_figure` for each labelled config, saved as `architecture_bytes`."""
    return save(size_breakdown_figure(estimates, limit), name, out_dir)


@checks_out_dir
def plot_grid(df: "pandas.DataFrame", x: str, out_dir: str | Path = "figures",  # noqa: F821
              limit: int = LIMIT_BYTES, name: str | None = None) -> list[str]:
    """`grid_figure`, saved as `grid_<x>`."""
    return save(grid_figure(df, x, limit), name or f"grid_{x}", out_dir)


def grid_figure(df: "pandas.DataFrame", x: str, limit: int = LIMIT_BYTES) -> Any:  # noqa: F821
    """`trials.grid` rows: val BPB (left) and artifact bytes (right: measured, and the estimate with its
    band) against the tweak `x`."""
    if df is None or len(df) == 0 or x not in df.columns:
        raise PgolfError(f"grid plot: needs rows with a column {x!r} (pgolf.lab.trials.grid)")
    d = df.sort_values(x)
    fig = new_figure(11, 4)
    ax, bx = fig.subplots(1, 2)
    curve(ax, d[x], d["val_bpb"], color="C0")
    ax.set(xlabel=x, ylabel="val BPB", title=f"val BPB against {x}")
    if d["total_bytes"].notna().any():
        curve(bx, d[x], d["total_bytes"] / 1e6, color="C0", label="artifact (measured)")
    curve(bx, d[x], d["est_bytes"] / 1e6, color="C1", ls="--", label="estimate (trained model)")
    bx.fill_between(d[x], d["est_bytes_low"] / 1e6, d["est_bytes_high"] / 1e6, color="C1", alpha=0.15,
                    label="estimate band")
    limit_mark(bx, limit, scale=1e6, axis="y")
    bx.set(xlabel=x, ylabel="bytes, model + code (MB = 10^6 B)", title=f"artifact bytes against {x}")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig
