"""Quantisation and the 16,000,000-byte artifact (docs/records/record-stack.md §4).

int8.py      the baseline export (per-row int8 + zlib) the trainer writes
gptq.py      RTN and GPTQ with SDClip scales, per-row absmax int8 for gates
lqer.py      low-rank correction of the largest quantisation errors
compress.py  zlib / lzma / brotli / zstd, byte shuffle, "best"
pergroup.py  per-group streams with row reordering (PR #1855)
artifact.py  the quantised state, serialisation, `load_artifact`, byte accounting
hessian.py   calibration on training data, Hessians cached in the run directory
pipeline.py  `pgolf quantize`; analysis.py: `sweep(run, grid)`, Pareto front and figure

Imports stay lazy here. The code bytes of an artifact are the exported record script's
(pgolf.script.codebytes).
"""
from __future__ import annotations


def sweep(run, grid, **kwargs):
    """Bytes and BPB change per grid point (see `pgolf.quant.analysis.sweep`)."""
    from pgolf.quant.analysis import sweep as _sweep

    return _sweep(run, grid, **kwargs)


__all__ = ["sweep"]
