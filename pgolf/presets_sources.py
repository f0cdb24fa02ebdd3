"""Where every number of the named presets comes from: one table of facts, each with its source PR.

`SOURCES[preset]` maps a dotted config key to a `Fact`: the value, the PR whose run states it and
where it is stated. The records print their hyperparameters at the top of every log; those blocks
(seed 42, read from each PR's record folder) are the first authority, then the run's extra
environment arguments, then the script's defaults for switches the block does not print, then the
reference docs (docs/records/record-stack.md, docs/records/hedge-stack.md). Logs win over READMEs
(docs/records/record-stack.md §7.15).

A preset inherits its base PR's facts: `pr1765` lists #1626's values under #1626 because #1765 runs
#1626's pipeline and changes only its LoRA, so where a PR is silent the table names the ancestor whose
value is used. Entries with `pr=None` are the official baseline script, or pgolf-side choices that no
record states (how pgolf exports, or which codec stands in for the record's `lrzip`).

tests/test_preset_fidelity.py checks every preset against this table, field by field, and that a
record preset sets no value the table does not source.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class Fact(NamedTuple):
    value: Any
    pr: int | None  # the PR whose run states it (None: the official baseline script, or a pgolf choice)
    where: str  # log | args (the run's extra env arguments) | code (a script default the log omits) | doc §


def _facts(pr: int | None, where: str, values: dict[str, Any]) -> dict[str, Fact]:
    return {k: Fact(v, pr, where) for k, v in values.items()}


# ---- the official root train_gpt.py (docs/records/record-stack.md Appendix B; run log 2026-03-17_NaiveBaseline)
BASELINE = _facts(None, "root train_gpt.py", {
    "model.vocab_size": 1024, "model.num_layers": 9, "model.model_dim": 512, "model.num_heads": 8,
    "model.num_kv_heads": 4, "model.mlp_mult": 2.0, "model.activation": "relu2", "model.tie_embeddings": True,
    "model.tied_embed_init_std": 0.005, "model.logit_softcap": 30.0, "model.qk_norm": True,
    "model.qk_gain_init": 1.5, "model.rope_base": 10000.0, "model.rope_dims": 0, "model.unet_skips": True,
    "model.skip_gates": False, "model.resid_mix": True,
    "optim.matrix_lr": 0.04, "optim.scalar_lr": 0.04, "optim.tied_embed_lr": 0.05, "optim.muon_momentum": 0.95,
    "optim.muon_momentum_warmup_start": 0.85, "optim.muon_momentum_warmup_steps": 500,
    "optim.muon_backend_steps": 5, "optim.muon_coeffs": "classic", "optim.muon_wd": 0.0, "optim.beta1": 0.9,
    "optim.beta2": 0.95,
    "train.train_batch_tokens": 524_288, "train.train_seq_len": 1024, "train.eval_seq_len": 1024,
    "train.iterations": 20_000, "train.max_seconds": 600.0, "train.warmdown_iters": 1200,
    "train.micro_batch_tokens": 65_536,  # grad_accum_steps = 8 / world_size
    "train.val_every": 1000, "train.log_every": 200,  # VAL_LOSS_EVERY, TRAIN_LOG_EVERY
    "quant.method": "int8", "quant.compressor": "zlib", "quant.byte_shuffle": 0, "quant.passthrough_numel": 65_536,
    "data.shard_end": "splice",  # TokenStream.take splices a span across a shard's end
})

# ---- the #1530 -> #1626 stack as #1626 (dexhunter, 1.07193) logged it; #1765, #1767, #1784 and #1790
# change only what their own tables below list
_PR1626 = {
    **_facts(1626, "log", {
        "model.vocab_size": 8192, "model.num_layers": 11, "model.model_dim": 512, "model.num_heads": 8,
        "model.num_kv_heads": 4, "model.mlp_mult": 4.0, "model.tie_embeddings": True,
        "model.tied_embed_init_std": 0.005, "model.logit_softcap": 30.0, "model.rope_base": 10000.0,
        "model.rope_dims": 16, "model.rope_ntk_factor": 1.0,  # ROPE_YARN=0
        "model.ln_scale": True, "model.qk_gain_init": 5.0, "model.xsa_last_n": 11, "model.num_loops": 2,
        "model.loop_start": 3, "model.loop_end": 5, "model.enable_looping_at": 0.35,
        "model.parallel_start_layer": 8, "model.skip_gates": True,
        "optim.matrix_lr": 0.026, "optim.tied_embed_lr": 0.03, "optim.scalar_lr": 0.02, "optim.embed_lr": 0.6,
        "optim.muon_momentum": 0.97, "optim.muon_momentum_warmup_start": 0.92,
        "optim.muon_momentum_warmup_steps": 1500, "optim.muon_backend_steps": 5, "optim.muon_row_normalize": True,
        "optim.muon_wd": 0.095, "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.adam_eps": 1e-8,
        "optim.adam_wd": 0.02, "optim.embed_wd": 0.085, "optim.grad_clip_norm": 0.3, "optim.ema_decay": 0.9965,
        "train.train_batch_tokens": 786_432, "train.train_seq_len": 2048, "train.eval_seq_len": 2048,
        "train.iterations": 20_000, "train.max_seconds": 600.0, "train.warmup_steps": 20,
        "train.warmdown_frac": 0.75, "train.min_lr": 0.0, "train.gptq_reserve_seconds": 4.0,
        "train.val_batch_tokens": 524_288,
        "train.micro_batch_tokens": 98_304,  # grad_accum_steps 1 on world_size 8: 786,432 / 8
        "quant.attn_bits": 6, "quant.mlp_bits": 6, "quant.other_bits": 6,  # MATRIX_BITS
        "quant.embed_bits": 7, "quant.other_clip_sigmas": 12.85,  # MATRIX_CLIP_SIGMAS
        "quant.attn_clip_sigmas": 13.0, "quant.mlp_clip_sigmas": 12.0, "quant.embed_clip_sigmas": 15.0,
        "quant.calibration_batches": 16, "quant.compressor": "brotli",
        "ttt.batch_size": 64, "ttt.beta1": 0.0, "ttt.beta2": 0.999, "ttt.chunk_size": 48, "ttt.eval_seq_len": 2048,
        "ttt.grad_steps": 1, "ttt.k_lora": True, "ttt.mlp_lora": True, "ttt.o_lora": True, "ttt.lora_lr": 1e-4,
        "ttt.lora_rank": 96, "ttt.weight_decay": 0.5, "ttt.phases": 3, "ttt.prefix_docs": 2000,
        "ttt.global_lr": 0.001, "ttt.global_momentum": 0.9, "ttt.global_epochs": 1,
        "ttt.global_chunk_tokens": 32_768, "ttt.global_batch_seqs": 32, "ttt.global_grad_clip": 1.0,
    }),
    # switches the hyperparameter block does not print: the script's behaviour (docs/records/record-stack.md §)
    **_facts(1626, "code", {
        "model.activation": "leaky_relu2", "model.leaky_slope": 0.5,  # §2.5
        "model.init": "orthogonal",  # §2.11
        "model.doc_mask": True,  # VarLen attention from #1530, §1.5
        "optim.muon_coeffs": "classic",  # Polar Express only from #1787, §3.3
        "quant.method": "gptq", "quant.calibration_seqs": 48, "quant.calibration_seq_len": 2048,  # §4.2
        "quant.damp": 0.01, "quant.block_size": 128, "quant.act_order": True,  # §4.3
        "quant.byte_shuffle": 2,  # §4.6
        "ttt.method": "lora", "ttt.eps": 1e-10,  # §5.3
        "ttt.lora_alpha": 0.0, "ttt.warm_start_a": False,  # no alpha/r, A re-drawn (the #1765 README)
    }),
    # the procedures around the model, from #1530's code on (docs/fidelity.md holds each to a test)
    **_facts(1530, "code", {
        "data.segmentation": "varlen",  # one packed row per rank, _build_cu_seqlens, §1.5
        "data.shard_end": "micro",  # DocumentPackingLoader._prepare_batch: shard end checked per micro-step
        "model.tok_emb_bf16": True,  # model cast to bf16, controls restored to fp32: tok_emb stays bf16, §2.1
        "model.bf16_rounding": True,  # the same cast rounds the initial weights and RoPE's inv_freq buffer
        "optim.muon_momentum_bf16": True,  # the sharded Muon momentum buffer is bf16, §3.3
        "optim.grad_clip_scope": "rank",  # step_fn clips the local gradients; Optimizers.step all-reduces, §3.7
        "optim.muon_warmup_momentum": "keep_sharded",  # shard_mom survives the warm-up's restore, §3.8
        "optim.grad_reduce_bf16": True,  # Muon's bf16 padded_grad reduce-scatter and tok_emb's bf16 all-reduce (AVG)
        "model.bf16_stream": True,  # x = tok_emb(ids) stays bf16; _forward_hidden casts controls to x.dtype
        "quant.calibration_doc_mask": False,  # Hessians through forward_logits without cu_seqlens, §4.2
    }),
    **_facts(1626, "code", {"ttt.phase_select": "shortest"}),  # scored docs sorted by (batch, position), §5.5
    **_facts(1626, "code", {"ttt.global_procedure": "record"}),  # train_val_ttt_global_sgd_distributed, _find_docs
    **_facts(None, "pgolf: the records export through GPTQ, i.e. `pgolf quantize`", {"train.export": "none"}),
    **_facts(None, "pgolf: WARMDOWN_FRAC sets the warm-down, so no iteration count", {"train.warmdown_iters": 0}),
}

# #1765 (renqianluo): rank 128 at alpha 96 (scale 0.75), warm-start A, TTT WD 1.0; the rest is #1626's
PR1765 = {
    **_PR1626,
    **_facts(1765, "log", {"ttt.lora_rank": 128, "ttt.weight_decay": 1.0}),
    **_facts(1765, "args", {"ttt.lora_alpha": 96.0, "ttt.warm_start_a": True}),
}

# #1767 (renqianluo): #1765 with alpha 144 (scale 1.125 at rank 128); the base of #1784 and #1790
_PR1767 = {**PR1765, **_facts(1767, "args", {"ttt.lora_alpha": 144.0})}

# #1784 (renqianluo): #1767 + dense GatedAttn (init std 0.005) mirrored into TTT + per-row int8 gate
PR1784 = {
    **_PR1767,
    **_facts(1784, "args", {"model.attn_gate": "dense", "model.attn_gate_init_std": 0.005}),
    **_facts(1784, "log", {"quant.gate_int8": True}),  # "int8_per_row: blocks.attn.attn_gate_w"
}

# #1790 (miaoyuxun): #1767's code + SmearGate + AttnOutGate width 24 + QK gain 5.25
PR1790 = {
    **_PR1767,
    **_facts(1790, "log", {"model.qk_gain_init": 5.25, "model.smear_gate": "gated", "model.smear_gate_width": 12,
                           "model.attn_gate": "attn_out", "model.attn_gate_width": 24}),
    **_facts(1790, "code", {"model.attn_gate_input": "block",  # the gate reads the attention's input
                            "model.smear_bos_mask": False}),  # before the #1851/#1855 BOS fix
}

_LORA_SETTINGS = ("ttt.lora_rank", "ttt.lora_alpha", "ttt.warm_start_a", "ttt.weight_decay")

# #1787 (nprime06): #1736 + Polar Express + MIN_LR 0.1 + SparseAttnGate + fused CE; its TTT score used
# #1767's settings (docs/records/record-stack.md §6.3), which #1801 and #1855 restate below
_PR1787 = {
    **{k: f for k, f in _PR1626.items() if k not in _LORA_SETTINGS},
    **_facts(1787, "log", {
        "model.attn_gate": "sparse", "model.attn_gate_width": 12,  # GATE_WINDOW
        "model.attn_gate_scale": 1.0, "model.attn_gate_init_std": 0.0,
        "train.gptq_reserve_seconds": 0.5, "train.min_lr": 0.1, "train.fused_ce": True, "quant.gate_int8": True,
    }),
    **_facts(1787, "code", {"optim.muon_coeffs": "polar_express"}),  # PR #1344's coefficients, §3.3
}

# #1801 (leon2k2k2k): #1787 + the frozen alpha/beta recurrent carry; TTT rank 96 at alpha 144, WD 1.0
PR1801 = {
    **_PR1787,
    **_facts(1801, "log", {"model.recur_carry": "frozen", "ttt.lora_rank": 96, "ttt.lora_alpha": 144.0,
                           "ttt.weight_decay": 1.0}),
    **_facts(1801, "code", {"ttt.warm_start_a": True}),  # its LoRA reset keeps A unconditionally
}

# #1855 (codemath3000): #1787 + BOS-masked SmearGate + LQER asym + per-group compression + 9 overrides
# (docs/records/record-stack.md Appendix A)
PR1855 = {
    **_PR1787,
    **_facts(1855, "log", {
        "model.smear_gate": "gated", "model.smear_gate_width": 12,  # SMEAR_GATE_ENABLED, GATE_WINDOW
        "model.attn_gate_scale": 0.5, "optim.beta2": 0.99, "train.warmdown_frac": 0.85,
        "quant.mlp_clip_sigmas": 11.5, "quant.embed_clip_sigmas": 14.0,
        "quant.lqer": True, "quant.lqer_rank": 4, "quant.lqer_top_k": 3, "quant.lqer_asym": True,
        "quant.lqer_group": 64, "quant.lqer_factor_bits": 4, "quant.compressor": "pergroup",
        "ttt.lora_rank": 80, "ttt.beta2": 0.99, "ttt.weight_decay": 0.5, "ttt.prefix_docs": 2500,
    }),
    **_facts(1855, "code", {"model.smear_bos_mask": True,  # the leak fix, §2.2
                            "ttt.lora_alpha": 144.0, "ttt.warm_start_a": True,  # Appendix A.5
                            # _serialize_pergroup: the remainder is plain brotli (no byte shuffle)
                            "quant.byte_shuffle": 0}),
    **_facts(None, "pgolf: ZPAQ (the `zpaq` package, method 5) stands in for the record's `lrzip -z -L 9` "
             "(rzip, then libzpaq at lrzip's level 3; docs/records/record-stack.md §4.6)",
             {"quant.group_codec": "zpaq"}),
}

# ---- PR #430 (= #824) as its three runs were configured (docs/records/hedge-stack.md §4.4: no environment
# overrides, the script's defaults). The model is the #606 base of the Hedge line (§1.1-1.2), the
# quantiser and the TTT extras are the #688 family's (§1.4, §6.2), CROWN-Q is #700's (§1.2).
PR430 = {
    **_facts(606, "docs/records/hedge-stack.md §1.1-1.2", {
        "model.vocab_size": 1024, "model.num_layers": 11, "model.model_dim": 512, "model.num_heads": 8,
        "model.num_kv_heads": 8, "model.mlp_mult": 3.5, "model.activation": "leaky_relu2", "model.leaky_slope": 0.5,
        "model.init": "orthogonal", "model.rope_dims": 16,
        "model.rope_ntk_factor": 2.0,  # Rotary hard-codes 1024, runs at 2048: base 10000 * 2^(16/14)
        "model.qk_gain_init": 1.5, "model.ln_scale": True, "model.smear_gate": "channel",
        "model.smear_bos_mask": False, "model.bigram_dim": 128, "model.bigram_scale_init": 0.05,
        "model.ve_dim": 128, "model.ve_layers": [9, 10], "model.ve_scale_init": 0.1, "model.skip_gates": False,
        "optim.matrix_lr": 0.025, "optim.tied_embed_lr": 0.035, "optim.scalar_lr": 0.025,
        "optim.muon_momentum": 0.99, "optim.muon_momentum_warmup_start": 0.92,
        "optim.muon_momentum_warmup_steps": 1500, "optim.muon_coeffs": "classic", "optim.muon_wd": 0.04,
        "optim.beta1": 0.9, "optim.beta2": 0.95, "optim.adam_wd": 0.04, "optim.embed_wd": 0.04,
        "optim.grad_clip_norm": 0.3, "optim.ema_decay": 0.997,
        "train.train_batch_tokens": 786_432, "train.micro_batch_tokens": 98_304, "train.train_seq_len": 2048,
        "train.eval_seq_len": 2048, "train.max_seconds": 600.0, "train.warmdown_iters": 3500,
        "train.gptq_reserve_seconds": 18.0,  # a 582 s loop + 18 s for EMA, calibration and quantisation
        "train.warmup_steps": 20,
    }),
    **_facts(430, "docs/records/hedge-stack.md §3, §4", {
        "model.xsa_last_n": 11, "model.bigram_buckets": 6144,  # never set: the script's defaults ran
        "model.attn_gate": "head_scalar", "model.value_residual": True, "eval.stride": 64,
    }),
    **_facts(430, "#824's train_gpt.py (fork sahiee-dev/parameter-golf 61e1497): the root's TokenStream", {
        "data.shard_end": "splice"}),
    **_facts(688, "docs/records/hedge-stack.md §1.4", {
        "quant.method": "gptq", "quant.attn_bits": 5, "quant.mlp_bits": 5, "quant.other_bits": 5,
        "quant.embed_bits": 8, "quant.calibration_batches": 1, "quant.calibration_seqs": 128,
        "quant.clip_mode": "quantile", "quant.act_order_ascending": True, "quant.prune_quantile": 0.03,
        "quant.damp": 0.01, "quant.block_size": 128, "quant.compressor": "zstd", "quant.byte_shuffle": 0,
    }),
    **_facts(688, "docs/records/hedge-stack.md §6.2", {
        "ttt.sgd_chunk_tokens": 32_768, "ttt.sgd_epochs": 3, "ttt.sgd_lr": 5e-4, "ttt.sgd_params": "last2",
        "ttt.sgd_optimizer": "adamw", "ttt.sgd_lr_ramp": 3.0, "ttt.sgd_byte_weighted": True,
        "ttt.sgd_polyak": 0.998, "ttt.sgd_temperature": 0.98, "ttt.sgd_grad_clip": 1.0,
    }),
    **_facts(688, "docs/records/hedge-stack.md §5.1-5.4", {
        "ttt.method": "hedge", "ttt.hedge_eta": 0.1, "ttt.hedge_alpha": 0.1, "ttt.hedge_trigram_buckets": 65_536,
        "ttt.hedge_neural_prior": 2.0}),
    **_facts(700, "docs/records/hedge-stack.md §1.2", {
        "optim.crown_q_lambda": 0.01, "optim.crown_q_clip_range": 15, "optim.crown_q_below_lr": 0.5}),
    **_facts(None, "pgolf: the records export through GPTQ, i.e. `pgolf quantize`", {"train.export": "none"}),
}

SOURCES: dict[str, dict[str, Fact]] = {
    "baseline": BASELINE,
    "pr430": PR430,
    "pr1765": PR1765,
    "pr1784": PR1784,
    "pr1790": PR1790,
    "pr1801": PR1801,
    "pr1855": PR1855,
}


def value_at(cfg: Any, key: str) -> Any:
    """The value of dotted `key` ("section.field") in a Config."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def mismatches(cfg: Any, facts: dict[str, Fact]) -> list[str]:
    """One line per fact the config does not carry, naming the key, both values and the source PR."""
    out = []
    for key, f in facts.items():
        got = value_at(cfg, key)
        if got != f.value:
            src = f"#{f.pr}" if f.pr is not None else "baseline/pgolf"
            out.append(f"{cfg.preset}: {key} = {got!r}, but {src} ({f.where}) states {f.value!r}")
    return out


def table(preset: str) -> list[dict[str, Any]]:
    """The facts of one preset as rows (key, value, pr, where), e.g. for a DataFrame."""
    return [{"key": k, "value": f.value, "pr": f.pr, "where": f.where} for k, f in SOURCES[preset].items()]
