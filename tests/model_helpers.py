"""Helpers of the model tests: tiny versions of every preset (features kept) and non-trivial weights.

Most parameters start at values that hide a path (zero O and MLP-down projections, zero gates, zero
bigram tables), so a test that compares two forwards at initialisation can pass for the wrong
reason. `randomize_` moves every parameter away from its init; `keep` names the ones a test needs
at their initial value.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from pgolf.config import Config
from pgolf.model import GPT, build_model
from pgolf.presets import PRESETS, get_preset

V = 256  # tiny vocabulary
BOS = 1  # data.bos_id of every preset
ALL_PRESETS = list(PRESETS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: a second intra-op thread only spins (10-50x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_overrides(name: str) -> list[str]:
    """`--set` overrides that shrink preset `name` (d 64, 4 heads, V 256) but keep every switch it sets."""
    m = get_preset(name).model
    kv = 4 if m.num_kv_heads == m.num_heads else 2  # MHA stays MHA, GQA stays GQA
    o = ["model.model_dim=64", "model.num_heads=4", f"model.num_kv_heads={kv}", f"model.vocab_size={V}",
         "model.mlp_mult=2.0"]
    if m.rope_dims:
        o.append("model.rope_dims=8")  # partial: 8 of the 16 head dims
    if m.bigram_buckets:
        o += ["model.bigram_buckets=64", "model.bigram_dim=16"]
    if m.ve_dim:
        o.append("model.ve_dim=16")
    return o


def tiny_cfg(name: str = "baseline", *extra: str) -> Config:
    return get_preset(name, tiny_overrides(name) + list(extra))


def tiny_model(name: str = "baseline", *extra: str, seed: int = 0, looping: bool | None = None,
               randomize: bool = True, keep: tuple[str, ...] = ()) -> GPT:
    """A tiny `name` model (a fresh copy); looping on when the preset loops unless `looping` says otherwise."""
    model = copy.deepcopy(_built(name, extra, seed, randomize, tuple(keep)))
    model.looping = bool(model.cfg.num_loops) if looping is None else looping
    return model


@functools.lru_cache(maxsize=128)
def _built(name: str, extra: tuple[str, ...], seed: int, randomize: bool, keep: tuple[str, ...]) -> GPT:
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(name, *extra))
    if randomize:
        randomize_(model, keep=keep, seed=seed)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, keep: tuple[str, ...] = (), seed: int = 0) -> None:
    """Every parameter off its init: matrices and tables ~ N(0, 1/fan_in), the rest init + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(1000 + seed)
    for name, p in model.named_parameters():
        if any(k in name for k in keep):
            continue
        noise = torch.randn(p.shape, generator=g)
        matrix = p.ndim == 2 and not any(k in name for k in ("resid_mix", "skip_", "parallel_"))
        if matrix:
            p.copy_(noise / math.sqrt(p.shape[1]))
        else:
            p.add_(0.3 * noise)


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Load src's weights into dst (strict=False); returns src's keys that dst lacks. dst must miss none."""
    res = dst.load_state_dict(src.state_dict(), strict=False)
    assert res.missing_keys == [], f"dst has weights src lacks: {res.missing_keys}"
    return sorted(res.unexpected_keys)


def tokens(B: int = 2, T: int = 32, *, seed: int = 0, bos_at: tuple[int, ...] = ()) -> torch.Tensor:
    """(B, T) random ids in [2, V) (never BOS), with BOS placed at `bos_at` in every row."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, V, (B, T), generator=g)
    for t in bos_at:
        idx[:, t] = BOS
    return idx


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
