"""The main job of `make run`: embedded sample corpus -> train -> run directory + loss figure.

No download and no GPU needed: the sample corpus is the CPython documentation topics (a smoke corpus,
not FineWeb). On a machine with a CUDA GPU the `baseline` preset is trained instead of `cpu-smoke`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DATA = Path("data/sample")


def main() -> int:
    from pgolf.cli import main as cli
    from pgolf.lab.plots import plot_loss_curves

    if not (DATA / "manifest.json").exists():
        if cli(["data", "build", "--sample", "--vocab-size", "1024", "--out", str(DATA)]):
            return 1
    preset = "baseline" if torch.cuda.is_available() else "cpu-smoke"
    print(f"pgolf: training preset {preset} on {DATA} (the embedded smoke corpus)", file=sys.stderr)
    from io import StringIO
    from contextlib import redirect_stdout
    buf = StringIO()
    with redirect_stdout(buf):
        # Frequent logging and validation (the sample's validation split is small) for a useful curve.
        rc = cli(["train", "--preset", preset, "--data", str(DATA),
                  "--set", "train.log_every=5", "--set", "train.val_every=20"])
    out = buf.getvalue().strip().splitlines()
    if rc or not out:
        return rc or 1
    result = json.loads(out[-1])
    figures = plot_loss_curves(result["run_dir"], out_dir="figures")
    result["figures"] = [str(p) for p in figures]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
