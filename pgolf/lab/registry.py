"""Reading what runs wrote: the registry (`runs/index.jsonl` + each run's `result.json`) and the TTT
convergence records (`ttt.jsonl`), as pandas DataFrames for the notebooks, plots and statistics.

The write side (run directories, atomic files, the index line of a finished run) is `pgolf.runs`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pgolf.runs import INDEX, RunDir

if TYPE_CHECKING:
    import pandas


def load(root: str | Path = "runs") -> "pandas.DataFrame":  # noqa: F821
    """Every finished run listed in `<root>/index.jsonl`, one row each, with its latest results."""
    import pandas as pd

    index = Path(root) / INDEX
    rows: dict[str, dict[str, Any]] = {}
    if index.exists():
        for line in index.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            run = RunDir(entry["run_dir"])
            if not run.path.is_absolute() and not run.path.exists():
                run = RunDir(Path(root) / run.path.name)
            row = dict(entry)
            if run.file("result.json").exists():
                row.update({k: v for k, v in run.result().items() if not isinstance(v, (dict, list))})
            rows[str(run.path)] = row
    return pd.DataFrame(list(rows.values()))


def read_convergence(run_dirs: Sequence[str | Path], eval_id: str = "last") -> "pandas.DataFrame":  # noqa: F821
    """Rows of `ttt.jsonl` from each run (the last evaluation of each unless eval_id="all" or an id)."""
    import pandas as pd

    frames = []
    for d in run_dirs:
        p = Path(d) / "ttt.jsonl"
        if not p.exists():
            continue
        df = pd.DataFrame([json.loads(line) for line in p.read_text().splitlines() if line.strip()])
        if df.empty:
            continue
        if eval_id == "last":
            df = df[df["eval_id"] == df["eval_id"].iloc[-1]]
        elif eval_id != "all":
            df = df[df["eval_id"] == eval_id]
        df.insert(0, "run", Path(d).name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
