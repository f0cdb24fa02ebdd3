"""Reading what runs wrote: the registry (`runs/index.jsonl` + each run's `result.json`), the stages of
every run, and the TTT convergence records (`ttt.jsonl`), as pandas DataFrames for the notebooks,
plots and statistics.

The write side (run directories, atomic files, the index line of a finished run, stages) is
`pgolf.runs`. An evaluation in `ttt.jsonl` is complete once its `done` row is there; rows of one that
was killed (and a line cut short) are left out unless asked for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pgolf.errors import PgolfError
from pgolf.runs import INDEX, RunDir, read_jsonl, stages

if TYPE_CHECKING:
    import pandas


def _runs(root: str | Path) -> dict[str, tuple[RunDir, dict[str, Any]]]:
    """{run path: (run, its index line)} for every finished run in `<root>/index.jsonl` (the latest line).
    A run listed there whose folder no longer holds a finished run (deleted, or the folder reused by an
    attempt that did not finish) is left out, with a warning that names it."""
    import warnings

    index = Path(root) / INDEX
    out: dict[str, tuple[RunDir, dict[str, Any]]] = {}
    if index.exists():
        for line in index.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            run = RunDir(entry["run_dir"])
            if not run.path.is_absolute() and not run.path.exists():
                run = RunDir(Path(root) / run.path.name)
            out[str(run.path)] = (run, entry)
    gone = {path: why for path, (run, _) in out.items() if (why := _not_finished(run))}
    if gone:
        warnings.warn(f"{index}: {len(gone)} listed run(s) left out, no longer finished: "
                      + "; ".join(f"{p} ({why})" for p, why in gone.items()), stacklevel=3)
    return {p: v for p, v in out.items() if p not in gone}


def _not_finished(run: RunDir) -> str | None:
    """Why `run` no longer holds a finished run (None when it does; a finished result.json that fails its
    checks is kept, and `load` names the fault)."""
    if not run.path.is_dir():
        return "its folder is gone"
    try:
        status = json.loads(run.file("result.json").read_text()).get("status")
    except FileNotFoundError:
        return "no result.json"
    except (OSError, ValueError, AttributeError):
        return "result.json unreadable"
    return None if status == "finished" else f"status {status!r}"


def _result(run: RunDir) -> dict[str, Any]:
    """The run's result.json, or {"result_error": why} when it is missing its shape (one bad run does
    not hide the others)."""
    try:
        return run.result()
    except PgolfError as e:
        return {"result_error": str(e)}


def load(root: str | Path = "runs") -> "pandas.DataFrame":  # noqa: F821
    """Every finished run listed in `<root>/index.jsonl`, one row each, with its latest results (the
    flat keys) and its `stages` (a list, as `pgolf.runs.stages` returns them)."""
    import pandas as pd

    rows = []
    for run, entry in _runs(root).values():
        result = _result(run)
        row = dict(entry)
        row.update({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
        row["stages"] = stages(result) if "result_error" not in result else []
        rows.append(row)
    return pd.DataFrame(rows)


def latest_run(root: str | Path = "runs", needs: str = "final_model.pt") -> Path | None:
    """The most recently finished run in `<root>/index.jsonl` whose directory holds `needs` (None if none)."""
    for run, _ in reversed(list(_runs(root).values())):
        if run.file(needs).exists() and run.is_finished():
            return run.path
    return None


def config_labels(df: "pandas.DataFrame", key: str = "config_key", most: int = 3) -> dict[str, str]:  # noqa: F821
    """{config key: how it differs from the others}: its preset when the presets differ, then the config
    fields (`section.field=value`, seed and data paths left out) that differ between the configurations of
    the same preset; at most `most` fields, then "+N more". A configuration alone is named by its preset."""
    from pgolf.runs import _RUN_SPECIFIC

    firsts = df.drop_duplicates(key) if len(df) and key in df.columns else df.iloc[0:0]
    flat: dict[str, dict[str, Any]] = {}
    presets: dict[str, str] = {}
    for r in firsts.to_dict("records"):
        k = str(r[key])
        presets[k] = str(r.get("preset") or "?")
        try:
            cfg = RunDir(r["run_dir"]).config() if r.get("run_dir") else {}
        except PgolfError:
            cfg = {}
        flat[k] = {f"{sec}.{f}": v for sec, fields in cfg.items() if isinstance(fields, dict)
                   for f, v in fields.items() if (sec, f) not in _RUN_SPECIFIC}
    several_presets = len(set(presets.values())) > 1
    labels = {}
    for k in flat:
        peers = [flat[j] for j in flat if presets[j] == presets[k]]
        differ = [n for n in sorted({n for p in peers for n in p}) if len({json.dumps(p.get(n)) for p in peers}) > 1]
        diff = [f"{n}={json.dumps(flat[k].get(n))}" for n in differ]
        shown = diff[:most] + ([f"+{len(diff) - most} more"] if len(diff) > most else [])
        labels[k] = " ".join(([presets[k]] if several_presets or not shown else []) + shown)
    return _distinct(labels)


def _distinct(labels: dict[str, str]) -> dict[str, str]:
    """Labels that are still equal (configurations read without their config.json) get their key."""
    seen: dict[str, int] = {}
    for v in labels.values():
        seen[v] = seen.get(v, 0) + 1
    return {k: (f"{v} [{k}]" if seen[v] > 1 else v) for k, v in labels.items()}


def load_stages(root: str | Path = "runs") -> "pandas.DataFrame":  # noqa: F821
    """One row per stage of every finished run (`pgolf.runs.stages`): run_id, preset, seed, config_key,
    then the stage's name, weights, tokens, val_bpb, ... and `fewer_tokens`."""
    import pandas as pd

    rows = []
    for run, entry in _runs(root).values():
        result = _result(run)
        keys = {k: result.get(k, entry.get(k)) for k in ("run_id", "preset", "seed", "config_key")}
        rows += [{**keys, **s} for s in stages(result)]
    return pd.DataFrame(rows)


def read_convergence(run_dirs: Sequence[str | Path], eval_id: str = "last",
                     incomplete: bool = False) -> "pandas.DataFrame":  # noqa: F821
    """Rows of `ttt.jsonl` from each run: the last complete evaluation of each, unless eval_id="all" or
    an id. An evaluation without its `done` row (killed, or still running) is left out unless
    `incomplete`; the `complete` column says which is which."""
    import pandas as pd

    frames = []
    for d in run_dirs:
        p = Path(d) / "ttt.jsonl"
        if not p.exists():
            continue
        df = pd.DataFrame(read_jsonl(p))
        if df.empty or "eval_id" not in df:
            continue
        done = set(df.loc[df["kind"] == "done", "eval_id"]) if "kind" in df else set()
        df["complete"] = df["eval_id"].isin(done)
        if not incomplete:
            df = df[df["complete"]]
        if df.empty:
            continue
        if eval_id == "last":
            df = df[df["eval_id"] == df["eval_id"].iloc[-1]]
        elif eval_id != "all":
            df = df[df["eval_id"] == eval_id]
        df.insert(0, "run", Path(d).name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
