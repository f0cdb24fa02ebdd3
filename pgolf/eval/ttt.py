"""Test-time training: which method runs (`runner_for`) and `run_ttt`, what `pgolf eval --ttt` runs.

Methods (record-stack.md §5, hedge-stack.md §5-6):
- lora    per-document LoRA, score then update per chunk (lora_ttt.py; PR #1530, #1765)
          with `ttt.phases > 0`: phased global SGD on already scored documents (phased.py; #1610/#1626/#1700)
- sgd     score-first SGD on chunks of the stream (sgd_ttt.py; #549 / #430 line)
- hedge   score-first SGD with the normalised Hedge mixer of n-gram experts (hedge.py; #430 made legal)

The pieces the methods share live in ttt_base.py, below them.
"""
from __future__ import annotations

from typing import Any

import torch

from pgolf.errors import PgolfError
from pgolf.eval.hedge import HedgeTTT
from pgolf.eval.lora_ttt import LoRATTT
from pgolf.eval.phased import PhasedTTT
from pgolf.eval.sgd_ttt import SGDTTT
from pgolf.eval.trace import EvalStream
from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger

METHODS = ("lora", "sgd", "hedge")


def method_label(cfg: Any) -> str:
    """The TTT method as logs and results name it: "lora", "lora+3phase", "sgd", "hedge"."""
    tc = cfg.ttt
    return tc.method + (f"+{tc.phases}phase" if tc.method == "lora" and tc.phases else "")


def runner_for(cfg: Any):
    """The runner class of `cfg.ttt.method` (phased LoRA when `ttt.phases > 0`)."""
    method = cfg.ttt.method
    if method == "lora":
        return PhasedTTT if cfg.ttt.phases > 0 else LoRATTT
    if method == "sgd":
        return SGDTTT
    if method == "hedge":
        return HedgeTTT
    raise PgolfError(f"ttt.method: unknown method {method!r} (choose from {METHODS})")


def run_ttt(model: torch.nn.Module, val: Any, cfg: Any, stream: EvalStream, *, log: ConvergenceLog | None = None,
            ledger: TimeLedger | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Score the validation set once with test-time training; returns val_loss/val_bpb (+ steps).

    The caller's model is not modified (methods that train base weights work on a copy)."""
    runner = runner_for(cfg)(model, val, cfg, stream, log=log, ledger=ledger, rank=rank, world_size=world_size)
    return runner.run()
