"""The domain of every numeric config field, declared once and checked wherever a config is resolved.

`Config.from_dict` (and so every preset, `--set` override and loaded `config.json`) calls `check`
before anything divides by a value or builds a tensor, so `model.num_heads=0` is one error naming
the field ("model.num_heads: 0: expected >= 1"), not a ZeroDivisionError deep in the model.
tests/test_config_domains.py fails when a numeric field has no entry here, so a field added later
must get one. Cross-field rules (num_heads divides model_dim, loop_end < num_layers, ...) stay with
the code that owns them (`pgolf.model.validate`, `pgolf.train.validate_training`,
`pgolf.quant.quantize.validate`); choices of string fields are checked there too. One domain depends
on another field: quant.level's upper bound is the codecs' the config writes (`level_violation`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pgolf.errors import PgolfError


@dataclass(frozen=True)
class Range:
    """A closed (or half-open) interval; floats must also be finite."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # (lo, ... instead of [lo, ...
    hi_open: bool = False  # ..., hi) instead of ..., hi]

    def describe(self) -> str:
        if self.lo is None and self.hi is None:
            return ""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"within {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"

    def violation(self, v: Any) -> str | None:
        """None when `v` lies in the domain, else what was expected."""
        if isinstance(v, float) and not math.isfinite(v):
            return f"expected a finite number {self.describe()}".rstrip()
        below = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        above = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        return f"expected {self.describe()}" if below or above else None


def _num(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


COUNT = Range(1)  # sizes, counts, steps: >= 1
NONNEG = Range(0)  # counts and amounts where 0 means "off" or "none"
POSITIVE = Range(0, lo_open=True)  # scales that would zero a tensor or divide by zero at 0
FRACTION = Range(0, 1)
DECAY = Range(0, 1, hi_open=True)  # betas, EMA decays: 1 would freeze the average (or divide by 1 - 1)
BITS = Range(2, 8)

DOMAINS: dict[str, Range] = {
    # data
    "data.val_max_tokens": NONNEG,
    "data.bos_id": NONNEG,
    # model: shape
    "model.vocab_size": Range(2, 65536),  # shards store uint16 ids
    "model.num_layers": COUNT,
    "model.model_dim": COUNT,
    "model.num_heads": COUNT,
    "model.num_kv_heads": COUNT,
    "model.mlp_mult": POSITIVE,
    "model.leaky_slope": NONNEG,
    "model.tied_embed_init_std": NONNEG,
    "model.logit_softcap": NONNEG,  # 0 = no cap
    # model: attention
    "model.rope_base": POSITIVE,
    "model.rope_dims": NONNEG,
    "model.rope_ntk_factor": POSITIVE,
    "model.qk_gain_init": NONNEG,
    "model.xsa_last_n": NONNEG,
    "model.attn_gate_width": COUNT,
    "model.attn_gate_scale": NONNEG,
    "model.attn_gate_init_std": NONNEG,
    # model: embedding path
    "model.smear_gate_width": COUNT,
    "model.bigram_buckets": NONNEG,
    "model.bigram_dim": COUNT,
    "model.bigram_scale_init": NONNEG,
    "model.ve_dim": NONNEG,
    "model.ve_layers": NONNEG,  # each layer index
    "model.ve_scale_init": NONNEG,
    # model: structure
    "model.parallel_start_layer": Range(-1),  # -1 = off
    "model.num_loops": NONNEG,
    "model.loop_start": NONNEG,
    "model.loop_end": NONNEG,
    "model.enable_looping_at": FRACTION,
    # optim
    "optim.matrix_lr": NONNEG,
    "optim.scalar_lr": NONNEG,
    "optim.tied_embed_lr": NONNEG,
    "optim.embed_lr": NONNEG,
    "optim.head_lr": NONNEG,
    "optim.muon_momentum": FRACTION,
    "optim.muon_momentum_warmup_start": FRACTION,
    "optim.muon_momentum_warmup_steps": NONNEG,
    "optim.muon_backend_steps": COUNT,
    "optim.muon_wd": NONNEG,
    "optim.beta1": DECAY,
    "optim.beta2": DECAY,
    "optim.adam_eps": POSITIVE,  # 0 divides 0 by 0 where a parameter had no gradient yet (NaN)
    "optim.adam_wd": NONNEG,
    "optim.embed_wd": NONNEG,
    "optim.grad_clip_norm": NONNEG,  # 0 = off
    "optim.ema_decay": DECAY,  # 0 = off
    "optim.crown_q_lambda": NONNEG,
    "optim.crown_q_clip_range": COUNT,
    "optim.crown_q_below_lr": FRACTION,
    # train
    "train.seed": NONNEG,
    "train.train_batch_tokens": COUNT,
    "train.train_seq_len": COUNT,
    "train.micro_batch_tokens": NONNEG,  # 0 = train_batch_tokens / world
    "train.iterations": COUNT,
    "train.max_seconds": NONNEG,  # 0 = no budget
    "train.gptq_reserve_seconds": NONNEG,
    "train.warmdown_iters": NONNEG,
    "train.warmdown_frac": FRACTION,
    "train.min_lr": FRACTION,
    "train.warmup_steps": NONNEG,
    "train.val_every": NONNEG,  # 0 = only the final validation
    "train.val_batch_tokens": COUNT,
    "train.eval_seq_len": COUNT,
    "train.log_every": COUNT,
    # quant
    "quant.attn_bits": BITS,
    "quant.mlp_bits": BITS,
    "quant.embed_bits": BITS,
    "quant.other_bits": BITS,
    "quant.attn_clip_sigmas": POSITIVE,
    "quant.mlp_clip_sigmas": POSITIVE,
    "quant.embed_clip_sigmas": POSITIVE,
    "quant.other_clip_sigmas": POSITIVE,
    "quant.calibration_batches": COUNT,
    "quant.calibration_seqs": COUNT,
    "quant.calibration_seq_len": COUNT,
    "quant.damp": NONNEG,
    "quant.block_size": COUNT,
    "quant.gate_numel_min": NONNEG,
    "quant.gate_numel_max": NONNEG,
    "quant.passthrough_numel": NONNEG,
    "quant.lqer_rank": COUNT,
    "quant.lqer_top_k": NONNEG,
    "quant.lqer_group": COUNT,
    "quant.lqer_factor_bits": BITS,
    "quant.level": Range(-1),  # -1 = the strongest setting
    "quant.byte_shuffle": Range(0, 255),  # 0 = off, else the stride
    "quant.limit_bytes": COUNT,
    "quant.zpaq_threads": Range(1, 64),
    "quant.calibration_seed": NONNEG,
    "quant.eval_max_tokens": NONNEG,
    "quant.prune_quantile": DECAY,
    # eval
    "eval.seq_len": NONNEG,  # 0 = train.eval_seq_len
    "eval.stride": NONNEG,  # 0 = non-overlapping windows
    "eval.batch_seqs": COUNT,
    "eval.max_seconds": NONNEG,
    # ttt: LoRA
    "ttt.lora_rank": COUNT,
    "ttt.lora_alpha": NONNEG,  # 0 = no alpha/r scaling
    "ttt.lora_lr": NONNEG,
    "ttt.beta1": DECAY,
    "ttt.beta2": DECAY,
    "ttt.eps": POSITIVE,  # as optim.adam_eps
    "ttt.weight_decay": NONNEG,
    "ttt.chunk_size": COUNT,
    "ttt.eval_seq_len": COUNT,
    "ttt.batch_size": COUNT,
    "ttt.grad_steps": NONNEG,
    # ttt: phased global SGD
    "ttt.phases": NONNEG,
    "ttt.prefix_docs": NONNEG,
    "ttt.global_lr": NONNEG,
    "ttt.global_momentum": FRACTION,
    "ttt.global_epochs": NONNEG,
    "ttt.global_chunk_tokens": COUNT,
    "ttt.global_batch_seqs": COUNT,
    "ttt.global_grad_clip": NONNEG,
    # ttt: score-first SGD (#549 / #688 family)
    "ttt.sgd_chunk_tokens": COUNT,
    "ttt.sgd_epochs": NONNEG,  # 0 = a frozen model (the Hedge mixer alone)
    "ttt.sgd_lr": NONNEG,
    "ttt.sgd_momentum": FRACTION,
    "ttt.sgd_grad_clip": NONNEG,
    "ttt.sgd_lr_ramp": Range(1),  # 1 = no ramp
    "ttt.sgd_polyak": DECAY,  # 0 = off
    "ttt.sgd_temperature": Range(0, 2, lo_open=True),
    # ttt: Hedge mixer
    "ttt.hedge_eta": NONNEG,
    "ttt.hedge_alpha": POSITIVE,  # add-alpha smoothing: 0 gives empty counts zero probability
    "ttt.hedge_trigram_buckets": COUNT,
    "ttt.hedge_neural_prior": Range(),  # any finite log-weight
}


def check(cfg: Any, where: str = "config") -> None:
    """Raise one PgolfError naming the first field of `cfg` (a `pgolf.config.Config`) outside its domain."""
    prefix = "" if where in ("config", "--set") else f"{where}: "
    for key, domain in DOMAINS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for v in value if isinstance(value, list) else [value]:
            why = domain.violation(v)
            if why:
                raise PgolfError(f"{prefix}{key}: {value!r}: {why}")
    why = level_violation(cfg.quant)
    if why:
        raise PgolfError(f"{prefix}quant.level: {cfg.quant.level!r}: {why}")


# The strongest level each codec of pgolf.artifact.codecs takes (-1 means it). zpaq clamps any level
# into its 1..5; the other four are the fast codecs that "best" tries (codecs.BEST_CODECS, a test holds
# the two lists together: this module sits below the artifact package and does not import it).
MAX_LEVEL = {"zlib": 9, "lzma": 9, "brotli": 11, "zstd": 22}


def level_violation(q: Any) -> str | None:
    """quant.level's upper bound is the codecs': the strongest level of each one the config writes
    (pergroup: its group codec and brotli; best: every fast codec). Checked here, where a config is
    resolved, so an exported script, whose level is baked in, carries no check of it."""
    written = set(MAX_LEVEL) if q.compressor == "best" else \
        {q.group_codec, "brotli"} if q.compressor == "pergroup" else {q.compressor}
    for codec in sorted(written & set(MAX_LEVEL)):
        if q.level > MAX_LEVEL[codec]:
            return f"{codec} takes -1 (its strongest) or 0..{MAX_LEVEL[codec]}"
    return None
