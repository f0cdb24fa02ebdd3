"""Helpers the notebooks call: project paths, architecture tweaks, size estimates and their tables.

The widgets of `architecture_tweaks.ipynb` are thin wrappers: `tweak_widget` calls exactly
`estimate(tweaked(preset, overrides, **values))`, the function the notebook's headless path calls,
so both show the same numbers. Short training runs (train both, a grid of widths) are
`pgolf.lab.trials`; this module builds models only on the meta device.

`estimate` is a calibrated entropy estimate, not a measurement. `raw_bits` takes each quantised
matrix as Gaussian, rounded per row with its bits and clip (SDClip k*std/R; the #688 family's per-row
quantile clip simulated on Gaussian rows; the baseline's int8 at the row maximum), plus fp16 row
scales, gates, passthrough tensors and LQER factors. The artifact is that times a ratio fitted per
codec and clip family on real artifacts (`pgolf.lab.size_calibration`: the records' logged model
blobs and pgolf's own quantised CPU runs), which also gives the error band `bytes_low`..`bytes_high`.
`pgolf quantize` measures the real size.
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.presets import get_preset

if TYPE_CHECKING:
    import pandas

FP16_BITS = 16.0  # passthrough fp16 values, before the codec (its ratio is fitted on whole artifacts)
SCALE_BITS = 16.0  # one fp16 scale per quantised row


# ---- paths

def project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding `pyproject.toml` and `pgolf/`."""
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "pgolf").is_dir():
            return p
    return here


def enter_project_root() -> Path:
    """chdir to the project root, so notebook paths (runs/, figures/, data/) mean the same from
    JupyterLab (started in notebooks/) and from `pgolf sweep` (started in the root)."""
    root = project_root()
    os.chdir(root)
    return root


# ---- tweaks: widget name -> (config path, choices | (min, max, step))

TWEAKS: dict[str, tuple[str, Any]] = {
    "attn_gate": ("model.attn_gate", ("none", "attn_out", "dense", "sparse", "head_scalar")),
    "attn_gate_width": ("model.attn_gate_width", (1, 64, 1)),
    "attn_gate_scale": ("model.attn_gate_scale", (0.1, 4.0, 0.1)),
    "smear_gate": ("model.smear_gate", ("off", "gated", "channel")),
    "num_loops": ("model.num_loops", (0, 4, 1)),
    "loop_start": ("model.loop_start", (0, 15, 1)),
    "loop_end": ("model.loop_end", (0, 15, 1)),
    "parallel_start_layer": ("model.parallel_start_layer", (-1, 15, 1)),
    "num_layers": ("model.num_layers", (1, 16, 1)),
    "model_dim": ("model.model_dim", (64, 1024, 64)),
    "mlp_mult": ("model.mlp_mult", (1.0, 6.0, 0.5)),
    "mlp_bits": ("quant.mlp_bits", (2, 8, 1)),
    "attn_bits": ("quant.attn_bits", (2, 8, 1)),
}


def _get(cfg: Config, path: str) -> Any:
    section, key = path.split(".")
    return getattr(getattr(cfg, section), key)


def tweak_overrides(**values: Any) -> list[str]:
    """Tweak values -> `--set` strings (JSON values, as the command line parses them)."""
    out = []
    for name, value in values.items():
        if name not in TWEAKS:
            raise PgolfError(f"unknown tweak {name!r} (choose from {', '.join(TWEAKS)})")
        out.append(f"{TWEAKS[name][0]}={json.dumps(value)}")
    return out


def tweaked(preset: str, overrides: Sequence[str] = (), **values: Any) -> Config:
    """The preset with its overrides, then the tweak values."""
    return get_preset(preset, [*overrides, *tweak_overrides(**values)])


def overrides_from(cfg: Config) -> list[str]:
    """The `--set` list that turns `cfg.preset` into `cfg` (so a Config can be trained by name)."""
    base = get_preset(cfg.preset).to_dict()
    out = []
    for section, fields in cfg.to_dict().items():
        if isinstance(fields, dict):
            for k, v in fields.items():
                if base[section][k] != v:
                    out.append(f"{section}.{k}={json.dumps(v)}")
    return out


def write_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write `cfg` as `<run_dir>/config.json` (what `pgolf.train --config` reads) and return its path.
    The configuration is checked first, as `pgolf train` checks it (a value set on `cfg` directly never went
    through `--set`): a bad one is an error naming the key, and no run folder is made."""
    from pgolf.runs import RunDir
    from pgolf.train import check_config

    check_config(cfg, "the configuration")
    run = RunDir(run_dir)
    if run.is_finished():
        raise PgolfError(f"{run.path}: already holds a finished run (choose another run_name or run_dir)")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", cfg.to_dict())
    return run.file("config.json")


# ---- size estimate

def _entropy(counts: Any) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


@functools.lru_cache(maxsize=None)
def _gaussian_entropy_bits(R: int, k: float) -> float:
    """Entropy (bits) of round(z / s) clamped to [-R, R], z ~ N(0, 1), s = k / R."""
    import torch

    edges = (torch.arange(-R, R, dtype=torch.float64) + 0.5) * (k / R)  # 2R bin edges
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * (1 + torch.erf(edges / 2 ** 0.5)),
                     torch.ones(1, dtype=torch.float64)])
    return _entropy(cdf.diff())


@functools.lru_cache(maxsize=None)
def _quantile_entropy_bits(bits: int, cols: int) -> float:
    """Entropy (bits) of the #688 family's per-row quantile clip (the best of its |w| quantiles by
    row MSE) on Gaussian rows of `cols` entries, simulated on 64 seeded rows. (The 3% magnitude
    pruning only zeroes values that round to 0 anyway at these steps.)"""
    import torch

    from pgolf.quant.gptq import clip_range, quantile_clip_scale

    R = clip_range(bits)
    w = torch.randn(64, cols, generator=torch.Generator().manual_seed(0))
    q = torch.clamp(torch.round(w / quantile_clip_scale(w, bits).float()[:, None]), -R, R)
    return _entropy(torch.bincount((q + R).long().flatten(), minlength=2 * R + 1).double())


def raw_bits(cfg: Config, model: Any = None) -> dict[str, float]:
    """Bits of each kind of tensor in the artifact before its codec (see the module docstring).

    Tensors are sorted exactly as `pgolf quantize` sorts them (`pgolf.quant.quantize.classify` and
    `tensor_group`). `model`: the config's model on the meta device, if already built."""
    from pgolf.artifact.int8 import is_control
    from pgolf.model import build_model  # torch, but only the meta device
    from pgolf.quant.quantize import classify, group_setting, tensor_group

    model = model if model is not None else build_model(cfg, "meta")
    q = cfg.quant
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        n, kind = p.numel(), classify(name, p, q)
        rows = p.shape[0] if p.dim() >= 2 else 0
        if kind == "gate":  # per-row absmax int8
            per = 8.0
        elif kind == "quant":
            kind, cols = tensor_group(name), p.shape[-1]
            rows = n // cols
            bits, k = group_setting(q, kind)
            if q.method == "int8":  # the baseline clips at a row percentile ~ the row maximum
                per = _gaussian_entropy_bits(127, math.sqrt(2 * math.log(2 * cols)))
            elif q.clip_mode == "quantile":
                per = _quantile_entropy_bits(bits, cols)
            else:
                per = _gaussian_entropy_bits(2 ** (bits - 1) - 1, k)
        else:  # fp16 passthrough (the baseline keeps control tensors fp32)
            per, rows, kind = (32.0 if q.method == "int8" and is_control(name) else FP16_BITS), 0, "passthrough"
        out[kind] = out.get(kind, 0.0) + n * per + rows * SCALE_BITS
    if q.lqer and q.method != "int8":  # rank-r factors of the top-k matrices (PR #1797 / #1855)
        mats = sorted((p.shape for _, p in model.named_parameters() if p.dim() == 2), key=lambda s: -s[0] * s[1])
        out["lqer"] = float(sum(q.lqer_rank * (r + c) * q.lqer_factor_bits for r, c in mats[:q.lqer_top_k]))
    return out


def calibration_for(q: Any) -> Any:
    """The fitted ratio and band of this quantisation's codec / clip family (UNCALIBRATED if none)."""
    from pgolf.lab.size_calibration import CALIBRATION, UNCALIBRATED, family

    return CALIBRATION.get(family(q), UNCALIBRATED)


def estimate(cfg: Config, code_bytes: int | None = None) -> dict[str, Any]:
    """Trainable parameters and the artifact (model + code) in bytes: a point estimate and a band.

    `bytes` is the point estimate (a fully trained model, as the records were), `bytes_low` ..
    `bytes_high` the band every calibration artifact of this codec / clip family fell in (widened a
    little); `over_limit` only when even `bytes_low` is over `quant.limit_bytes`, `maybe_over` when
    the band straddles it, `under_limit` when all of it is under. `code_bytes` is one input (default:
    the exported record script's, as `pgolf quantize` counts it; cached per config), added to every figure.
    """
    from pgolf.script.codebytes import code_bytes as counted
    from pgolf.lab.size_calibration import family
    from pgolf.model import build_model, count_params

    code_bytes = int(counted(cfg)["code_bytes"]) if code_bytes is None else int(code_bytes)
    model = build_model(cfg, "meta")
    parts = raw_bits(cfg, model)
    cal = calibration_for(cfg.quant)
    raw = sum(parts.values()) / 8
    model_bytes = int(raw * cal.ratio)
    low, high = int(raw * cal.low) + code_bytes, int(raw * cal.high) + code_bytes
    limit = cfg.quant.limit_bytes
    return {"preset": cfg.preset, "params": count_params(model), "est_model_bytes": model_bytes,
            "code_bytes": code_bytes, "bytes": model_bytes + code_bytes, "bytes_low": low, "bytes_high": high,
            "est_artifact_bytes": model_bytes + code_bytes, "limit": limit, "over_limit": low > limit,
            "maybe_over": low <= limit < high, "under_limit": high <= limit,
            "calibration": {"family": family(cfg.quant), "ratio": cal.ratio, "low": cal.low, "high": cal.high,
                            "points": cal.points},
            "bytes_by_kind": {k: int(v / 8 * cal.ratio) for k, v in sorted(parts.items())}}


# ---- tables

def verdict(est: dict[str, Any]) -> str:
    """Against the limit, by the estimate's band: "over" only when the whole band is over."""
    return "over" if est["over_limit"] else "maybe over" if est["maybe_over"] else "under"


def deltas(base: dict[str, Any], tweak: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """{row: (preset, tweak, tweak - preset)} over the numbers of two `estimate` dicts: params, the
    artifact estimate and its band, model and code bytes, and the bytes of each tensor group."""
    rows = {"params": "params", "est. artifact bytes": "bytes", "  band low": "bytes_low",
            "  band high": "bytes_high", "est. model bytes": "est_model_bytes", "code bytes": "code_bytes"}
    out = {row: (int(base[k]), int(tweak[k])) for row, k in rows.items()}
    for kind in sorted(set(base["bytes_by_kind"]) | set(tweak["bytes_by_kind"])):
        out[f"  {kind} bytes"] = (int(base["bytes_by_kind"].get(kind, 0)), int(tweak["bytes_by_kind"].get(kind, 0)))
    return {row: (a, b, b - a) for row, (a, b) in out.items()}


def delta_table(base: dict[str, Any], tweak: dict[str, Any], base_label: str = "preset",
                tweak_label: str = "tweak") -> "pandas.DataFrame":  # noqa: F821
    """The preset -> tweak table: both columns, the change and the change in percent, then each one's
    standing against the limit (by its band)."""
    import pandas as pd

    rows = {row: {base_label: f"{a:,}", tweak_label: f"{b:,}", "Δ": f"{d:+,}" if d else "0",
                  "Δ %": f"{100 * d / a:+.1f}%" if a and d else ""}
            for row, (a, b, d) in deltas(base, tweak).items()}
    rows[f"vs {tweak['limit']:,}"] = {base_label: verdict(base), tweak_label: verdict(tweak), "Δ": "", "Δ %": ""}
    return pd.DataFrame.from_dict(rows, orient="index")


def estimate_html(est: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """The live estimate line. Its classes are the browser test's hooks (tests/browser): plain integers
    in `pgolf-params` and `pgolf-bytes` (`est_artifact_bytes`), inside `pgolf-estimate`; then the band,
    the verdict ("over" only when the whole band is over) and the change against `base`."""
    if "error" in est:
        return f'<div class="pgolf-estimate pgolf-invalid">invalid: {html.escape(est["error"])}</div>'
    change = (f" · vs preset {est['params'] - base['params']:+,} params, {est['bytes'] - base['bytes']:+,} B"
              if base else "")
    return (f'<div class="pgolf-estimate"><b>params</b> <span class="pgolf-params">{est["params"]}</span> · '
            f'<b>est. artifact bytes</b> <span class="pgolf-bytes">{est["est_artifact_bytes"]}</span> '
            f'(band {est["bytes_low"]:,} – {est["bytes_high"]:,}) · '
            f'<span class="pgolf-verdict">{verdict(est)} {est["limit"]:,}</span>{change}</div>')


# ---- widgets

SLIDER_WIDTH = "560px"  # description + track + readout: ~7 px per step for the widest range (1..64)
DESCRIPTION = {"description_width": "150px"}


def _control(name: str, value: Any):
    import ipywidgets as w

    _, spec = TWEAKS[name]
    if isinstance(spec[0], str):
        return w.Dropdown(options=list(spec), value=value, description=name, style=DESCRIPTION,
                          layout=w.Layout(width="330px"))
    lo, hi, step = spec
    kw = dict(description=name, continuous_update=False, style=DESCRIPTION, layout=w.Layout(width=SLIDER_WIDTH))
    if isinstance(step, float) or isinstance(value, float):
        return w.FloatSlider(value=value, min=lo, max=max(hi, value), step=step, **kw)
    return w.IntSlider(value=value, min=min(lo, value), max=max(hi, value), step=step, **kw)


def tweak_widget(preset: str, overrides: Sequence[str] = (), names: Sequence[str] | None = None,
                 figure: bool = True):
    """A live `ipywidgets.interactive` over the tweaks; its `.result` is the tweak's `estimate` dict.

    Every change shows the preset -> tweak table (`delta_table`) and redraws the size figure
    (`plots.size_breakdown_figure`, preset and tweak per tensor group); `.view` holds the latest
    {"table", "figure"}. The last child is the one-line estimate (`estimate_html`). Each control has
    `description` = the tweak name and the DOM class `pgolf-control-<name>`: the browser test
    (tests/browser) finds the widget by these hooks."""
    import ipywidgets as w
    from IPython.display import Image, display

    from pgolf.lab import plots

    base_cfg = get_preset(preset, list(overrides))
    base = estimate(base_cfg)
    names = list(names or TWEAKS)
    controls = {n: _control(n, _get(base_cfg, TWEAKS[n][0])) for n in names}
    for n, c in controls.items():
        c.add_class(f"pgolf-control-{n}")
    line = w.HTML()
    view: dict[str, Any] = {}

    def show(**values: Any) -> dict[str, Any]:
        try:
            est = estimate(tweaked(preset, overrides, **values))
        except PgolfError as e:  # an impossible combination: say why, keep the widget alive
            print(f"invalid: {e}")
            line.value = estimate_html({"error": str(e)})
            return {"error": str(e)}
        line.value = estimate_html(est, base)
        view["table"] = delta_table(base, est, preset)
        display(view["table"])
        if figure:
            view["figure"] = plots.size_breakdown_figure({preset: base, "tweak": est}, limit=est["limit"])
            if plots.in_kernel():  # into the widget's output (the inline backend draws nothing in a callback)
                display(Image(data=plots.png_bytes(view["figure"])))
        return est

    widget = w.interactive(show, **controls)
    widget.children = (*widget.children, line)
    widget.view = view
    return widget


def widget_values(widget: Any) -> dict[str, Any]:
    return dict(widget.kwargs)


def set_widget_values(widget: Any, **values: Any) -> dict[str, Any]:
    """Move the controls to `values` and recompute (what a user's clicks do), returning `.result`."""
    by_name = {c.description: c for c in widget.kwargs_widgets}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise PgolfError(f"no control named {unknown[0]!r}")
    # Recompute once at the end, not after each control (a half-moved set can be an invalid config).
    for c in by_name.values():
        c.unobserve(widget.update, names="value")
    try:
        for name, value in values.items():
            by_name[name].value = value
    finally:
        for c in by_name.values():
            c.observe(widget.update, names="value")
    widget.update()
    return widget.result
