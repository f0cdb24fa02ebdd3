"""Test-time training: which method runs (`runner_for`) and `run_ttt`, what `pgolf eval --ttt` runs.

Methods (docs/records/record-stack.md §5, docs/records/hedge-stack.md §5-6):
- lora    per-document LoRA, score then update per chunk (lora_ttt.py; PR #1530, #1765)
          with `ttt.phases > 0`: phased global SGD on already scored documents (phased.py; #1610/#1626/#1700)
- sgd     score-first SGD on chunks of the stream (sgd_ttt.py; #549 / #430 line)
- hedge   score-first SGD with the normalised Hedge mixer of n-gram experts (hedge.py; #430 made legal)

`RUNNERS` is the table of runners; each entry imports its module only when called, so code that
imports this module does not carry every method, and an exported record script keeps only the entry
its configuration reaches (`pgolf.script.bundle` trims the table by `runner_key`). The pieces the
methods share live in ttt_base.py, below them.
"""
from __future__ import annotations

from typing import Any

import torch

from pgolf.config import Config
from pgolf.errors import PgolfError
from pgolf.eval.trace import EvalStream
from pgolf.eval.ttt_base import ConvergenceLog, TimeLedger

METHODS = ("lora", "sgd", "hedge")


def _lora():
    from pgolf.eval.lora_ttt import LoRATTT
    return LoRATTT


def _phased():
    from pgolf.eval.phased import PhasedTTT
    return PhasedTTT


def _sgd():
    from pgolf.eval.sgd_ttt import SGDTTT
    return SGDTTT


def _hedge():
    from pgolf.eval.hedge import HedgeTTT
    return HedgeTTT


RUNNERS = {"lora": _lora, "phased": _phased, "sgd": _sgd, "hedge": _hedge}  # runner_key -> its class, on demand


def method_label(cfg: Config) -> str:
    """The TTT method as logs and results name it: "lora", "lora+3phase", "sgd", "hedge"."""
    tc = cfg.ttt
    return tc.method + (f"+{tc.phases}phase" if tc.method == "lora" and tc.phases else "")


def runner_key(cfg: Config) -> str:
    """The `RUNNERS` entry of `cfg.ttt.method` ("phased" for LoRA with `ttt.phases > 0`)."""
    method = cfg.ttt.method
    if method not in METHODS:
        raise PgolfError(f"ttt.method: unknown method {method!r} (choose from {METHODS})")
    if method == "lora" and cfg.ttt.chunk_size > cfg.ttt.eval_seq_len:  # a chunk is scored in one window
        raise PgolfError(f"ttt.chunk_size: {cfg.ttt.chunk_size}: expected <= ttt.eval_seq_len "
                         f"{cfg.ttt.eval_seq_len} (LoRA TTT scores each chunk inside one context window)")
    return "phased" if method == "lora" and cfg.ttt.phases > 0 else method


def runner_for(cfg: Config):
    """The runner class of `cfg.ttt.method`."""
    key = runner_key(cfg)
    if key not in RUNNERS:  # only in an exported script, whose table holds its own method alone
        raise PgolfError(f"ttt.method: {key!r} is not part of this script (it runs {', '.join(RUNNERS)})")
    return RUNNERS[key]()


def run_ttt(model: torch.nn.Module, val: Any, cfg: Config, stream: EvalStream, *, log: ConvergenceLog | None = None,
            ledger: TimeLedger | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Score the validation set once with test-time training; returns val_loss/val_bpb (+ steps).

    The caller's model is not modified (methods that train base weights work on a copy)."""
    runner = runner_for(cfg)(model, val, cfg, stream, log=log, ledger=ledger, rank=rank, world_size=world_size)
    return runner.run()
