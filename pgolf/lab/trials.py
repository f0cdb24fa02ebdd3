"""Short training trials from a notebook: the preset against a tweak ("train both"), and a grid of one
tweak's values (e.g. gate widths 8, 12, 16, 24, 32) against val BPB and artifact bytes.

Every run trains in torchrun child processes (`pgolf.lab.live.train` -> `pgolf.lab.launch`) with the same
data, seed and time budget, under `runs/compare/` by default (kept out of `runs/index.jsonl`, so a quick
look never mixes with the seed statistics). With `progress`, each run shows one status line that follows
it (phase, step, time, loss; then its result) instead of its log. The widgets are thin wrappers: they call
`compare` / `grid`, the functions the headless cells and the tests call.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.lab import live, plots
from pgolf.lab.workbench import TWEAKS, estimate, overrides_from, tweaked, widget_values
from pgolf.presets import get_preset

if TYPE_CHECKING:
    import pandas

RESULT_KEYS = ("params", "steps", "train_seconds", "val_loss", "val_bpb", "total_bytes")


def data_ready(data: str | Path) -> str:
    """"" when `data` is a data folder (validation shards present), else what to run first."""
    if any(Path(data).glob("fineweb_val_*.bin")):
        return ""
    return (f"{data}: no data folder here yet (no fineweb_val_*.bin). Run `make run` first (it builds data/sample "
            "from the embedded sample), or point `data` at a folder made by `pgolf data build` / `pgolf data fetch`.")


def compare(configs: dict[str, Config], seconds: float, data: str, *, tokenizer: str = "", seed: int = 1337,
            nproc: int = 1, runs_root: str | Path = "runs/compare", progress: bool = False,
            echo: Any = None) -> "pandas.DataFrame":  # noqa: F821
    """Train each configuration for `seconds` (same data, seed and budget); one row each: its label, params,
    steps, val BPB, artifact bytes (`total_bytes`, when it exported), the change of val BPB and bytes
    against the first configuration, and its run directory."""
    import pandas as pd

    if not configs:
        raise PgolfError("compare: no configurations given")
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    quiet = (lambda s: None) if progress and echo is None else echo
    for i, (label, cfg) in enumerate(configs.items(), 1):
        sets = overrides_from(cfg)
        tag = hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:6]
        slug = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(label))[:30]
        out = Path(runs_root) / f"{stamp}_{slug}-{tag}_s{seed}"
        res = live.train(out, budget_seconds=seconds, label=f"[{i}/{len(configs)}] {label}", figure=False,
                         line=progress, preset=cfg.preset, data=data, nproc=nproc, tokenizer=tokenizer or None,
                         seed=seed, max_seconds=seconds, overrides=sets, echo=quiet)
        rows.append({"label": label, **{k: res.get(k) for k in RESULT_KEYS}, "run_dir": res.get("run_dir", str(out))})
    table = pd.DataFrame(rows)
    for col, delta in (("val_bpb", "Δ val_bpb"), ("total_bytes", "Δ total_bytes")):
        first = table[col].iloc[0]
        table.insert(table.columns.get_loc("run_dir"), delta,
                     [v - first if v is not None and first is not None and v == v else None for v in table[col]])
    return table


def grid(preset: str, overrides: Sequence[str], tweak: str, values: Sequence[Any], seconds: float, data: str, *,
         base_values: dict[str, Any] | None = None, tokenizer: str = "", seed: int = 1337, nproc: int = 1,
         runs_root: str | Path = "runs/compare", progress: bool = False) -> "pandas.DataFrame":  # noqa: F821
    """Train the preset with the tweak `tweak` at each of `values` (the other tweaks at `base_values`): the
    `compare` table with the value first and the estimate of each (`est_bytes` and its band) beside the
    measured artifact bytes."""
    if tweak not in TWEAKS:
        raise PgolfError(f"unknown tweak {tweak!r} (choose from {', '.join(TWEAKS)})")
    if not values:
        raise PgolfError(f"grid over {tweak}: no values given")
    configs = {f"{tweak}={v}": tweaked(preset, overrides, **{**(base_values or {}), tweak: v}) for v in values}
    ests = [estimate(cfg) for cfg in configs.values()]
    table = compare(configs, seconds, data, tokenizer=tokenizer, seed=seed, nproc=nproc, runs_root=runs_root,
                    progress=progress)
    table.insert(0, tweak, list(values))
    at = table.columns.get_loc("run_dir")
    for i, (col, key) in enumerate((("est_bytes", "bytes"), ("est_bytes_low", "bytes_low"),
                                    ("est_bytes_high", "bytes_high"))):
        table.insert(at + i, col, [e[key] for e in ests])
    return table


def parse_values(text: str) -> list[Any]:
    """"8, 12, 16" -> [8, 12, 16] (JSON numbers or names)."""
    out = []
    for item in (t.strip() for t in text.replace(";", ",").split(",")):
        if item:
            try:
                out.append(json.loads(item))
            except json.JSONDecodeError:
                out.append(item)
    return out


# ---- widgets

def compare_widget(controls: Any, preset: str, overrides: Sequence[str], data: str, *, tokenizer: str = "",
                   seed: int = 1337, runs_root: str | Path = "runs/compare", seconds: float = 30.0,
                   figures_dir: str | Path = "figures"):
    """On click: `compare` the preset with the tweak the controls show: a progress line per run, then one
    table and both loss curves on one figure."""
    import ipywidgets as w
    from IPython.display import display

    def train_both(seconds: float) -> None:
        message = data_ready(data)
        if message:
            print(message)
            return
        configs = {preset: get_preset(preset, list(overrides)),
                   "tweak": tweaked(preset, overrides, **widget_values(controls))}
        table = compare(configs, seconds, data, tokenizer=tokenizer, seed=seed, runs_root=runs_root, progress=True)
        display(table.drop(columns=["run_dir"]))
        plots.plot_loss_overlay(dict(zip(table["label"], table["run_dir"])), out_dir=figures_dir)

    box = w.BoundedFloatText(value=seconds, min=5, max=600, step=5, description="seconds each", style={
        "description_width": "150px"}, layout=w.Layout(width="260px"))
    return w.interactive(train_both, {"manual": True, "manual_name": "train both"}, seconds=box)


def grid_widget(controls: Any, preset: str, overrides: Sequence[str], data: str, *, tokenizer: str = "",
                seed: int = 1337, runs_root: str | Path = "runs/compare", seconds: float = 30.0,
                values: str = "8, 12, 16, 24, 32", tweak: str = "attn_gate_width", figures_dir: str | Path = "figures"):
    """On click: `grid` over one numeric tweak (the others as the controls show them): a progress line
    per run, then the table and val BPB / bytes against the tweak (`plots.plot_grid`)."""
    import ipywidgets as w
    from IPython.display import display

    numeric = [n for n, (_, spec) in TWEAKS.items() if not isinstance(spec[0], str)]
    if tweak not in numeric:
        raise PgolfError(f"grid tweak {tweak!r}: expected a numeric tweak ({', '.join(numeric)})")
    style, wide = {"description_width": "150px"}, w.Layout(width="420px")

    def run_grid(tweak: str, values: str, seconds: float) -> None:
        message = data_ready(data)
        if message:
            print(message)
            return
        base = {k: v for k, v in widget_values(controls).items() if k != tweak}
        table = grid(preset, overrides, tweak, parse_values(values), seconds, data, base_values=base,
                     tokenizer=tokenizer, seed=seed, runs_root=runs_root, progress=True)
        display(table.drop(columns=["run_dir"]))
        plots.plot_grid(table, tweak, out_dir=figures_dir)

    return w.interactive(run_grid, {"manual": True, "manual_name": "run grid"},
                         tweak=w.Dropdown(options=numeric, value=tweak, description="tweak", style=style, layout=wide),
                         values=w.Text(value=values, description="values", style=style, layout=wide),
                         seconds=w.BoundedFloatText(value=seconds, min=5, max=600, step=5, description="seconds each",
                                                    style=style, layout=w.Layout(width="260px")))
