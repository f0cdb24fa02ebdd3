#!/usr/bin/env python3
"""The git clean filter of the notebooks: a notebook on stdin, the same notebook without outputs on stdout.

`.gitattributes` names it for `*.ipynb` and `make` installs it (`git config filter.nbstrip.clean ...`), so
a notebook run and saved in JupyterLab (autosave does) shows no change in `git diff` and reaches the index
and commits clean (`git status` may list it until `git add`, which then stages nothing): code cells
without outputs or execution counts, no widget state, no per-cell timings, no papermill metadata,
`language_info` reduced to its name. Sources, cell ids, tags and the kernelspec are kept. The JSON is
written as Jupyter writes it (indent 1, sorted keys). Standard library only (git runs it with the system
Python); anything that is not notebook JSON passes through unchanged.
"""
from __future__ import annotations

import json
import sys
from typing import Any

CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "papermill", "ExecuteTime")
NOTEBOOK_METADATA_KEPT = ("kernelspec", "language_info")


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        for key in CELL_METADATA_DROPPED:
            meta.pop(key, None)
    meta = nb.get("metadata", {})
    nb["metadata"] = {k: meta[k] for k in NOTEBOOK_METADATA_KEPT if k in meta}
    if isinstance(nb["metadata"].get("language_info"), dict):
        nb["metadata"]["language_info"] = {"name": nb["metadata"]["language_info"].get("name", "python")}
    return nb


def main() -> int:
    raw = sys.stdin.buffer.read()
    try:
        nb = json.loads(raw)
    except ValueError:
        nb = None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        sys.stdout.buffer.write(raw)
        return 0
    sys.stdout.buffer.write((json.dumps(strip(nb), indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
