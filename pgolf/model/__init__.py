"""The model: one GPT with every record feature as a config switch (see gpt.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from pgolf.config import Config, ModelConfig
from pgolf.errors import PgolfError
from pgolf.model.gpt import GPT, count_params, validate
from pgolf.model.lora import BatchedLoRA

__all__ = ["GPT", "BatchedLoRA", "build_model", "build_with_state", "count_params", "validate", "load_from_run"]


def build_model(cfg: Config | ModelConfig, device: str | torch.device = "cpu", *,
                attention_backend: str | None = None) -> GPT:
    """A freshly initialised model on `device` ("meta" builds without allocating); the attention kernel
    is `attention_backend`, else the one train.attention_backend resolves to on `device` (SDPA on a CPU)."""
    from pgolf.model.attention import resolve_backend

    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    bos = cfg.data.bos_id if isinstance(cfg, Config) else 1
    max_doc_len = max_doc_len_of(cfg) if isinstance(cfg, Config) else 0
    if attention_backend is None:
        attention_backend = resolve_backend(cfg.train.attention_backend if isinstance(cfg, Config) else "auto", device)
    with torch.device(device):
        return GPT(mcfg, bos_id=bos, attention_backend=attention_backend, max_doc_len=max_doc_len)


def max_doc_len_of(cfg: Config) -> int:
    """The model's length cut: train.train_seq_len for packed rows (`varlen`), 0 for fixed rows."""
    seg = cfg.data.segmentation
    if seg not in ("rows", "varlen"):
        raise PgolfError(f"data.segmentation: unknown segmentation {seg!r} (rows | varlen)")
    return cfg.train.train_seq_len if seg == "varlen" else 0


def build_with_state(cfg: Config, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     name: str = "the run's weights") -> GPT:
    """A fresh model with `state` loaded (strict) and looping on, as evaluated and calibrated
    (docs/records/record-stack.md §2.6, §4.2); `name` says whose weights in the error when they do not fit."""
    model = build_model(cfg, device)
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    except RuntimeError as e:
        raise PgolfError(f"{name}: weights do not fit the run's model ({str(e).splitlines()[0]})") from None
    model.looping = bool(cfg.model.num_loops)
    return model


def load_from_run(run_dir: str | Path, device: str | torch.device = "cpu",
                  weights: str = "final_model.pt") -> tuple[Config, GPT]:
    """The config and final (EMA) weights of a finished training run, with looping as trained."""
    from pgolf.runs import resolve

    run = resolve(run_dir)
    cfg = Config.load(run.file("config.json"))
    model = build_model(cfg, device)
    state = torch.load(run.file(weights), map_location=device, weights_only=True)
    model.load_state_dict(state)
    model.looping = bool(cfg.model.num_loops)  # looping stays on for evaluation (docs/records/record-stack.md §2.6)
    return cfg, model
