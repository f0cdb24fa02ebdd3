"""Helpers the notebooks call: project paths, architecture tweaks, size estimates, short comparisons.

The widgets of `architecture_tweaks.ipynb` are thin wrappers: `tweak_widget` calls exactly
`estimate(tweaked(preset, overrides, **values))`, the function the notebook's headless path calls,
so both show the same numbers. Training (`compare`) runs in torchrun child processes through
`pgolf.lab.launch`; this module builds models only on the meta device.

`estimate` is an entropy estimate, not a measurement: each quantised matrix is taken as Gaussian,
rounded per row with the configured bits and clip (SDClip k*std/R for GPTQ/RTN, the row maximum for
the baseline's int8), and compressed to its entropy times a codec overhead. Trained weights have
heavier tails than a Gaussian, so the true size (from `pgolf quantize`) is usually a little lower:
against the records' logged model blobs the estimate is +0.2 % (pr1801 vs #1787), +1 % (pr1855 vs
#1855) and +7 % (pr1765 vs #1626, whose MLP clip is 10 sigma).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.presets import get_preset

# Compressed size / entropy of the integer stream (zlib and pergroup measured loosely on int8 planes).
# fp16 of Gaussian-like weights: sign + ~3 bits of exponent entropy + 10 mantissa bits (zlib measured 13.9).
FP16_BITS = 14.0
CODEC_OVERHEAD = {"zlib": 1.04, "lzma": 1.01, "brotli": 1.01, "zstd": 1.02, "pergroup": 1.0, "best": 1.0}


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
    """Write `cfg` as `<run_dir>/config.json` (what `pgolf.train --config` reads) and return its path."""
    from pgolf.runs import RunDir

    run = RunDir(run_dir)
    if run.is_finished():
        raise PgolfError(f"{run.path}: already holds a finished run (choose another run_name or run_dir)")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json("config.json", cfg.to_dict())
    return run.file("config.json")


# ---- size estimate

def _gaussian_entropy_bits(R: int, k: float) -> float:
    """Entropy (bits) of round(z / s) clamped to [-R, R], z ~ N(0, 1), s = k / R."""
    s = k / R
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    h = 0.0
    for j in range(-R, R + 1):
        lo = -math.inf if j == -R else (j - 0.5) * s
        hi = math.inf if j == R else (j + 0.5) * s
        p = (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))
        if p > 0:
            h -= p * math.log2(p)
    return h


def estimate(cfg: Config, code_bytes: int | None = None) -> dict[str, Any]:
    """Trainable parameters and an estimate of the compressed artifact (model + code) in bytes.

    Tensors are sorted exactly as `pgolf quantize` sorts them (`pgolf.quant.quantize.classify` and
    `tensor_group`); only the compressed size of each is estimated.
    """
    from pgolf.model import build_model, count_params  # torch, but only the meta device
    from pgolf.quant.quantize import classify, group_setting, tensor_group
    from pgolf.artifact.int8 import is_control

    if code_bytes is None:  # the exported record script's, as `pgolf quantize` counts it (cached per config)
        from pgolf.export.codebytes import code_bytes as counted
        code_bytes = counted(cfg)["code_bytes"]
    model = build_model(cfg, "meta")
    q = cfg.quant
    total_bits, by_kind = 0.0, {}
    for name, p in model.named_parameters():
        n, kind = p.numel(), classify(name, p, q)
        rows = p.shape[0] if p.dim() >= 2 else 0
        if kind == "gate":  # per-row absmax int8
            per = 8.0
        elif kind == "quant":
            kind = tensor_group(name)
            rows = n // p.shape[-1]
            if q.method == "int8":  # the baseline clips at a row percentile ~ the row maximum
                per = _gaussian_entropy_bits(127, math.sqrt(2 * math.log(2 * p.shape[-1])))
            else:
                bits, k = group_setting(q, kind)
                per = _gaussian_entropy_bits(2 ** (bits - 1) - 1, k)
        else:  # fp16 passthrough (the baseline keeps control tensors fp32)
            per, rows, kind = (32.0 if q.method == "int8" and is_control(name) else FP16_BITS), 0, "passthrough"
        kb = n * per + rows * 16  # + one fp16 scale per row
        total_bits += kb
        by_kind[kind] = by_kind.get(kind, 0.0) + kb / 8
    if q.lqer and q.method != "int8":  # rank-r factors of the top-k matrices (PR #1797 / #1855)
        mats = sorted((p.shape for _, p in model.named_parameters() if p.dim() == 2), key=lambda s: -s[0] * s[1])
        lq = sum(q.lqer_rank * (r + c) * q.lqer_factor_bits for r, c in mats[:q.lqer_top_k])
        total_bits += lq
        by_kind["lqer"] = lq / 8
    model_bytes = int(total_bits / 8 * CODEC_OVERHEAD.get(q.compressor, 1.0))
    total = model_bytes + int(code_bytes)
    return {"preset": cfg.preset, "params": count_params(model), "est_model_bytes": model_bytes,
            "code_bytes": int(code_bytes), "est_artifact_bytes": total, "under_limit": total <= cfg.quant.limit_bytes,
            "bytes_by_kind": {k: int(v) for k, v in sorted(by_kind.items())}}


# ---- widgets

def _control(name: str, value: Any):
    import ipywidgets as w

    _, spec = TWEAKS[name]
    style = {"description_width": "150px"}
    if isinstance(spec[0], str):
        return w.Dropdown(options=list(spec), value=value, description=name, style=style)
    lo, hi, step = spec
    if isinstance(step, float) or isinstance(value, float):
        return w.FloatSlider(value=value, min=lo, max=max(hi, value), step=step, description=name,
                             continuous_update=False, style=style)
    return w.IntSlider(value=value, min=min(lo, value), max=max(hi, value), step=step, description=name,
                       continuous_update=False, style=style)


def tweak_widget(preset: str, overrides: Sequence[str] = (), names: Sequence[str] | None = None):
    """A live `ipywidgets.interactive` over the tweaks; its `.result` is the `estimate` dict."""
    import ipywidgets as w
    from IPython.display import display

    base = get_preset(preset, list(overrides))
    names = list(names or TWEAKS)
    controls = {n: _control(n, _get(base, TWEAKS[n][0])) for n in names}

    def show(**values: Any) -> dict[str, Any]:
        try:
            est = estimate(tweaked(preset, overrides, **values))
        except PgolfError as e:  # an impossible combination: say why, keep the widget alive
            print(f"invalid: {e}")
            return {"error": str(e)}
        display(estimate_table(est))
        return est

    return w.interactive(show, **controls)


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


def compare_widget(controls: Any, preset: str, overrides: Sequence[str], data: str, *, tokenizer: str = "",
                   seed: int = 1337, runs_root: str | Path = "runs/compare", seconds: float = 30.0):
    """`interact_manual`-style: on click, `compare` the preset with the tweak the controls show."""
    import ipywidgets as w
    from IPython.display import display

    def train_both(seconds: float) -> "pandas.DataFrame":  # noqa: F821
        configs = {preset: get_preset(preset, list(overrides)),
                   "tweak": tweaked(preset, overrides, **widget_values(controls))}
        table = compare(configs, seconds, data, tokenizer=tokenizer, seed=seed, runs_root=runs_root)
        display(table)
        return table

    slider = w.FloatSlider(value=seconds, min=5, max=600, step=5, description="seconds each",
                           continuous_update=False)
    return w.interactive(train_both, {"manual": True, "manual_name": "train both"}, seconds=slider)


def estimate_table(estimates: dict[str, Any]) -> "pandas.DataFrame":  # noqa: F821
    """One `estimate` dict, or {label: estimate}, as a table with one column per configuration."""
    import pandas as pd

    if "params" in estimates:
        estimates = {estimates["preset"]: estimates}
    cols = {}
    for label, est in estimates.items():
        rows = {"params": est["params"], "est. model bytes": est["est_model_bytes"], "code bytes": est["code_bytes"],
                "est. artifact bytes": est["est_artifact_bytes"]}
        rows.update({f"  {k}": v for k, v in est["bytes_by_kind"].items()})
        cols[label] = pd.Series(rows).map("{:,}".format)
        cols[label]["under 16,000,000"] = str(est["under_limit"])
    return pd.DataFrame(cols).fillna("")


# ---- short comparison runs

def compare(configs: dict[str, Config], seconds: float, data: str, *, tokenizer: str = "", seed: int = 1337,
            nproc: int = 1, runs_root: str | Path = "runs/compare", echo: Any = None) -> "pandas.DataFrame":  # noqa: F821
    """Train each configuration for `seconds` (same data, seed and budget) and tabulate the results.

    The runs land under `runs_root` (default `runs/compare/`, kept out of `runs/index.jsonl` so a
    quick look never mixes with the seed statistics).
    """
    import pandas as pd

    from pgolf.lab import launch

    if not configs:
        raise PgolfError("compare: no configurations given")
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for label, cfg in configs.items():
        sets = overrides_from(cfg)
        tag = hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:6]
        slug = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in str(label))[:30]
        out = Path(runs_root) / f"{stamp}_{slug}-{tag}_s{seed}"
        res = launch.train(cfg.preset, data, nproc=nproc, tokenizer=tokenizer or None, out=str(out), seed=seed,
                           max_seconds=seconds, overrides=sets, echo=echo)
        rows.append({"label": label, **{k: res.get(k) for k in ("params", "steps", "train_seconds", "val_loss",
                                                                  "val_bpb")}, "run_dir": res.get("run_dir", str(out))})
    return pd.DataFrame(rows)


def config_summary(cfg: Config) -> dict[str, Any]:
    """The fields of `cfg.model` that differ from the default model (a compact description)."""
    default = dataclasses.asdict(Config().model)
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if default[k] != v}
