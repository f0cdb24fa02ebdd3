"""CPU step time of the segmentation modes at the same batch (docs/perf.md, issue 17).

    python scripts/segmentation_steps.py DATA_DIR [--steps 20] [--set k=v ...]

cpu-smoke shape (seq 256, 4,096-token batch) on real shards, three setups stepped in turn so that
load from other processes hits each alike: `rows` (fixed rows, no document mask, the preset as is),
`rows+mask` (fixed rows, SDPA with a dense (T, T) document mask) and `varlen` (one packed row, one
causal SDPA call per group of equal-length segments). Prints one JSON line of median ms per step,
wall-clock and this process's CPU time (the steadier of the two on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pgolf.data.loader import TrainLoader
from pgolf.model import build_model
from pgolf.optim import build_optimizers
from pgolf.presets import get_preset
from pgolf.train import batch_shape, optimizer_step

MODES = {"rows": [], "rows+mask": ["model.doc_mask=true"],
         "varlen": ["model.doc_mask=true", "data.segmentation=varlen"]}


def setup(data: str, overrides: list[str]):
    cfg = get_preset("cpu-smoke", overrides)
    torch.manual_seed(cfg.train.seed)
    t = cfg.train
    loader = TrainLoader(data, t.train_seq_len, vocab_size=cfg.model.vocab_size,
                         segmentation=cfg.data.segmentation, bos_id=cfg.data.bos_id)
    model = build_model(cfg)
    return cfg, loader, model, build_optimizers(model, cfg.optim, cfg.model.tie_embeddings)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    runs = {m: setup(args.data, o + args.overrides) for m, o in MODES.items()}
    times: dict[str, list[float]] = {m: [] for m in runs}
    cpu: dict[str, list[float]] = {m: [] for m in runs}
    for i in range(args.steps + 2):  # the first two steps of each are warm-up
        for m, (cfg, loader, model, opt) in runs.items():
            micro, accum = batch_shape(cfg, 1)
            batches = loader.next_batch(micro, accum)
            t0, c0 = time.perf_counter(), time.process_time()
            optimizer_step(model, model, opt, None, batches, cfg.optim.grad_clip_norm, 1.0, i, cfg.optim)
            if i >= 2:
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    ms = {m: round(1000 * statistics.median(v), 1) for m, v in times.items()}
    cpu_ms = {m: round(1000 * statistics.median(v), 1) for m, v in cpu.items()}
    print(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps, "ms_per_step": ms,
                      "cpu_ms_per_step": cpu_ms, "varlen_vs_rows": round(ms["varlen"] / ms["rows"], 3),
                      "varlen_vs_rows_cpu": round(cpu_ms["varlen"] / cpu_ms["rows"], 3)}))


if __name__ == "__main__":
    main()
