"""Small notebooks written for the sweep and Slurm tests: a tagged parameters cell and a body."""
from __future__ import annotations

from pathlib import Path

import nbformat


def parameterised_notebook(path: Path, params: str, body: str) -> Path:
    """Write a two-cell notebook on the python3 kernel (papermill injects after the tagged cell)."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path
