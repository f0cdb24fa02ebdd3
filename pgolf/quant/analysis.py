"""Precision against bytes: `sweep(run, grid)` quantises one trained run at every grid point.

The run is loaded once, its Hessians come from the run directory's cache (computed on the first
call), the unquantised score is taken once, and each point is quantised, serialised and re-loaded
in memory through the same bytes path as the artifact file, then scored.

Grid keys (values are lists; the points are their Cartesian product):
- "bits", "clip": bit width / clip multiplier k applied to every group in "groups";
- "groups": which groups "bits" and "clip" apply to ("attn", "mlp", "embed", "other", or tuples /
  "+"-joined names of several); default all four;
- "lqer_rank": 0 turns LQER off, r > 0 turns it on with rank r;
- any `QuantConfig` field by name ("method", "mlp_bits", "compressor", "lqer_top_k", ...).
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgolf.config import Config, QuantConfig
from pgolf.errors import PgolfError
from pgolf.artifact.qstate import load_artifact
from pgolf.quant import quantize as A
from pgolf.quant import pipeline as P

if TYPE_CHECKING:
    import pandas

ALL_GROUPS = A.GROUPS


def _groups(v: Any) -> tuple[str, ...]:
    gs = tuple(v.split("+")) if isinstance(v, str) else tuple(v)
    bad = [g for g in gs if g not in ALL_GROUPS]
    if bad:
        raise PgolfError(f"sweep: unknown group {bad[0]!r} (choose from {', '.join(ALL_GROUPS)})")
    return gs


def point_config(base: QuantConfig, point: dict[str, Any]) -> QuantConfig:
    """The QuantConfig of one grid point."""
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    groups = _groups(point.get("groups", ALL_GROUPS))
    upd: dict[str, Any] = {}
    for k, v in point.items():
        if k == "groups":
            continue
        if k == "bits":
            upd.update({f"{g}_bits": int(v) for g in groups})
        elif k in ("clip", "clip_sigmas"):
            upd.update({f"{g}_clip_sigmas": float(v) for g in groups})
        elif k == "lqer_rank":
            upd.update(lqer=int(v) > 0, lqer_rank=max(int(v), 0))
        elif k in fields:
            upd[k] = v
        else:
            raise PgolfError(f"sweep: unknown grid key {k!r} (bits, clip, groups, lqer_rank or a quant field)")
    return dataclasses.replace(base, **upd)


def sweep(run: str | Path, grid: dict[str, list], *, overrides: list[str] | None = None, device=None,
          evaluate: bool = True, verbose: bool = True) -> "pandas.DataFrame":  # noqa: F821
    """One row per grid point: the grid values, model/code/total bytes, bits per parameter, bytes per
    tensor group (`bytes_<group>`, as `byte_report`), val_bpb, delta_bpb (against the unquantised
    model on the same tokens) and seconds."""
    import pandas as pd

    from pgolf.script.codebytes import code_bytes

    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(list(grid[k]) for k in keys))]
    from pgolf.runs import check_overrides, resolve

    check_overrides(overrides or [], P.SECTIONS, "quant.sweep")
    cfg0 = Config.load(resolve(run).file("config.json")).with_overrides(overrides)
    configs = [point_config(cfg0.quant, pt) for pt in points]
    for c in configs:
        A.validate(c)  # every grid point is checked before the Hessians are computed
    need_h = any(c.method == "gptq" for c in configs)
    p = P.prepare(run, overrides, device=device, evaluate=evaluate, hessians=need_h)
    code = code_bytes(cfg0)["code_bytes"]
    rows = []
    warned: list[str] = []
    for pt, q in zip(points, configs):
        t0 = time.perf_counter()
        blob, qstate, info, streams = P.quantize_state(p, q)
        row: dict[str, Any] = {k: ("+".join(_groups(v)) if k == "groups" else v) for k, v in pt.items()}
        rep = A.byte_report(qstate, blob, streams)
        row.update(model_bytes=len(blob), code_bytes=code, total_bytes=len(blob) + code,
                   bits_per_param=rep["bits_per_param"],
                   **{f"bytes_{g}": n for g, n in rep["bytes_by_group"].items()})
        row["under_limit"] = row["total_bytes"] <= q.limit_bytes
        # the groups whose matrices this point really quantised (a small model's matrices may all sit under
        # quant.passthrough_numel, stored fp16 whatever the bits say)
        done = {t.get("group") for t in info["tensors"].values() if t.get("kind") == "quant"}
        row["quantised_groups"] = "+".join(g for g in ALL_GROUPS if g in done) or "none"
        idle = [g for g in _groups(pt["groups"]) if g not in done] if "groups" in pt else []
        if idle and verbose and idle != warned:
            warned[:] = idle
            print(f"sweep: no matrix of group(s) {', '.join(idle)} is quantised (each has at most "
                  f"quant.passthrough_numel={q.passthrough_numel:,} values, stored fp16): their settings change "
                  f"nothing", file=sys.stderr, flush=True)
        if evaluate:
            assert p.prequant is not None  # prepare(evaluate=True) scored the unquantised weights
            res = P.score(p.cfg, load_artifact(blob), p.val, p.device)
            row.update(val_bpb=res["val_bpb"], delta_bpb=res["val_bpb"] - p.prequant["val_bpb"])
        row["seconds"] = time.perf_counter() - t0
        row["label"] = " ".join(f"{k}={row[k]}" for k in keys)
        rows.append(row)
        if verbose:
            msg = f"sweep {row['label']}: {row['total_bytes']:,} B"
            print(msg + (f", val_bpb {row['val_bpb']:.4f} ({row['delta_bpb']:+.4f})" if evaluate else ""),
                  file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    df.attrs.update(prequant_bpb=p.prequant["val_bpb"] if p.prequant else None, limit=cfg0.quant.limit_bytes,
                    hessians=p.hessian_info)
    return df

