"""Named presets: plain functions returning a `Config`.

Each record preset carries the logged hyperparameters of that record (docs/records/record-stack.md
§6.8 and Appendix A; docs/records/hedge-stack.md for `pr430` as it was actually run). Where a README and the
logs disagree, the logs win (docs/records/record-stack.md §7.15). `pgolf.presets_sources` lists every one of those
numbers with the PR that states it; tests/test_preset_fidelity.py holds each preset to that table.
"""
from __future__ import annotations

from typing import Callable

from pgolf.config import Config
from pgolf.errors import PgolfError


def baseline() -> Config:
    """The official root `train_gpt.py`: 9x512, SP1024, 17,059,912 parameters, 1.2244 BPB."""
    c = Config(preset="baseline")
    c.train.micro_batch_tokens = 65_536  # grad_accum = 8 / world_size, as the official script
    # the official VAL_LOSS_EVERY=1000 (step 0 included) and TRAIN_LOG_EVERY=200: comparable loss curves
    c.train.val_every, c.train.log_every = 1000, 200
    c.quant.method = "int8"
    c.quant.compressor = "zlib"
    c.quant.byte_shuffle = 0
    c.data.shard_end = "splice"  # TokenStream.take: a span crossing a shard's end joins the next shard's start
    return c


def cpu_smoke() -> Config:
    """A small model that learns in about a minute on 2 CPU cores (for tests and `make run`)."""
    c = baseline()
    c.preset = "cpu-smoke"
    m = c.model
    m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult = 4, 128, 4, 2, 2.0
    t = c.train
    t.train_seq_len = t.eval_seq_len = 256
    t.train_batch_tokens = 4096
    t.micro_batch_tokens = 0  # the whole batch per rank
    t.max_seconds = 60.0
    t.warmup_steps = 0
    t.warmdown_iters = 0
    t.warmdown_frac = 0.3
    t.val_batch_tokens = 65_536
    t.val_every = 0  # only the final validation (a full one costs seconds on a CPU)
    t.log_every = 10
    o = c.optim
    o.matrix_lr, o.scalar_lr, o.tied_embed_lr = 0.03, 0.03, 0.05
    o.muon_momentum_warmup_steps = 50
    c.quant.calibration_batches, c.quant.calibration_seqs, c.quant.calibration_seq_len = 4, 8, 256
    c.ttt.eval_seq_len = 256
    c.ttt.lora_rank = 8
    c.ttt.chunk_size = 32
    c.ttt.batch_size = 16
    c.ttt.lora_lr = 3e-3
    c.ttt.global_chunk_tokens = 4096
    c.ttt.sgd_chunk_tokens = 4096
    c.ttt.prefix_docs = 40
    return c


def _record_1626() -> Config:
    """The #1530 -> #1626 stack as #1626 logged it: SP8192, 11x512 MLP4, partial RoPE, XSA-all, loops 3-5,
    two lanes, int7 embeddings, per-group clips (the #1765/#1767/#1784/#1790 base)."""
    c = Config()
    m = c.model
    m.vocab_size = 8192
    m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult = 11, 512, 8, 4, 4.0
    m.activation, m.leaky_slope = "leaky_relu2", 0.5
    m.init = "orthogonal"
    m.rope_dims = 16
    m.qk_gain_init = 5.0
    m.xsa_last_n = 11
    m.ln_scale = True
    m.skip_gates = True
    m.parallel_start_layer = 8
    m.num_loops, m.loop_start, m.loop_end, m.enable_looping_at = 2, 3, 5, 0.35
    m.doc_mask = True
    o = c.optim
    o.matrix_lr, o.tied_embed_lr, o.scalar_lr = 0.026, 0.03, 0.02
    o.muon_momentum, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps = 0.97, 0.92, 1500
    o.muon_row_normalize = True
    o.muon_wd = 0.095
    o.beta1, o.beta2 = 0.9, 0.95
    o.adam_wd, o.embed_wd = 0.02, 0.085
    o.grad_clip_norm = 0.3
    o.ema_decay = 0.9965
    t = c.train
    t.train_batch_tokens = 786_432
    t.micro_batch_tokens = 98_304  # 48 x 2048 per GPU: accumulation 1 on 8 GPUs, 8 on one
    t.train_seq_len = t.eval_seq_len = 2048
    t.warmdown_iters = 0
    t.warmdown_frac = 0.75
    t.gptq_reserve_seconds = 4.0
    t.export = "none"  # the records export through GPTQ (`pgolf quantize`)
    q = c.quant
    q.method = "gptq"
    q.attn_bits = q.mlp_bits = q.other_bits = 6
    q.embed_bits, q.embed_clip_sigmas = 7, 15.0  # int7 embeddings (#1586 via #1626)
    q.attn_clip_sigmas, q.mlp_clip_sigmas, q.other_clip_sigmas = 13.0, 12.0, 12.85
    q.compressor = "brotli"
    tt = c.ttt
    tt.method = "lora"
    tt.lora_rank, tt.lora_alpha, tt.warm_start_a = 96, 0.0, False
    tt.weight_decay, tt.beta2 = 0.5, 0.999
    tt.chunk_size = 48
    tt.phases, tt.prefix_docs = 3, 2000
    _record_procedures(c)
    return c


def _record_procedures(c: Config) -> None:
    """How the #1530-line records cut, calibrate, select and store (docs/fidelity.md)."""
    c.data.segmentation = "varlen"  # one packed row per rank, cut at BOS and every 2048 (_build_cu_seqlens)
    c.data.shard_end = "micro"  # _prepare_batch checks the shard's end before each micro-step
    c.quant.calibration_doc_mask = False  # collect_hessians: forward_logits(x) without cu_seqlens
    c.ttt.phase_select = "shortest"  # eval_val_ttt_phased: scored docs sorted by (batch index, position)
    c.ttt.global_procedure = "record"  # train_val_ttt_global_sgd_distributed on the _find_docs tokens
    c.model.tok_emb_bf16 = True  # GPT(h).bfloat16() + restore_fp32_params: only tok_emb stays bf16
    c.model.bf16_rounding = True  # ... and every initial value and RoPE's inv_freq are bf16 values
    c.model.bf16_stream = True  # ... so under autocast the stream is bf16 (controls cast to x.dtype)
    c.optim.muon_momentum_bf16 = True  # Muon: g = p.grad.bfloat16(), momentum_buffer zeros_like(g)
    c.optim.grad_clip_scope = "rank"  # no DDP: clip_grad_norm_ on each rank's gradient, then the all-reduce
    c.optim.grad_reduce_bf16 = True  # ... in bf16: Muon's bf16 padded_grad, tok_emb's own bf16 grad
    c.optim.muon_warmup_momentum = "keep_sharded"  # shard_mom is outside the state the warm-up restores


def pr1765() -> Config:
    """#1765 (renqianluo) on the #1626 stack: LoRA rank 128 with alpha/r scaling at alpha 96 (scale 0.75,
    the rank-96 magnitude with a third more A), warm-start A, TTT WD 1.0."""
    c = _record_1626()
    c.preset = "pr1765"
    tt = c.ttt
    tt.lora_rank, tt.lora_alpha, tt.warm_start_a, tt.weight_decay = 128, 96.0, True, 1.0
    return c


def _record_1767() -> Config:
    """#1767 (renqianluo): #1765 with alpha 144 (scale 1.125 at rank 128), the base of #1784 and #1790."""
    c = pr1765()
    c.ttt.lora_alpha = 144.0
    return c


def pr1784() -> Config:
    """#1784: #1767 + dense GatedAttn mirrored into TTT + per-row int8 gate."""
    c = _record_1767()
    c.preset = "pr1784"
    c.model.attn_gate, c.model.attn_gate_init_std = "dense", 0.005
    return c


def pr1790() -> Config:
    """#1790 (miaoyuxun): #1767's code + SmearGate + AttnOutGate width 24 + QK gain 5.25 + 3-phase global SGD."""
    c = _record_1767()
    c.preset = "pr1790"
    m = c.model
    m.qk_gain_init = 5.25
    m.smear_gate, m.smear_gate_width, m.smear_bos_mask = "gated", 12, False  # pre-#1851 (no BOS fix)
    m.attn_gate, m.attn_gate_width, m.attn_gate_input = "attn_out", 24, "block"
    return c


def _record_1787() -> Config:
    """#1787 (nprime06): #1736 + Polar Express + MIN_LR 0.1 + SparseAttnGate + fused CE + #1767 TTT."""
    c = _record_1626()
    m = c.model
    m.attn_gate, m.attn_gate_width, m.attn_gate_scale, m.attn_gate_init_std = "sparse", 12, 1.0, 0.0
    c.optim.muon_coeffs = "polar_express"
    t = c.train
    t.min_lr = 0.1
    t.gptq_reserve_seconds = 0.5
    tt = c.ttt
    tt.lora_rank, tt.lora_alpha, tt.warm_start_a = 96, 144.0, True
    tt.weight_decay, tt.beta2 = 1.0, 0.999
    return c


def pr1801() -> Config:
    """#1801 (leon2k2k2k): the #1787 stack + frozen alpha/beta recurrent carry (buffers)."""
    c = _record_1787()
    c.preset = "pr1801"
    c.model.recur_carry = "frozen"
    return c


def pr1855() -> Config:
    """#1855 (codemath3000), 1.06108 BPB: Appendix A of docs/records/record-stack.md, as logged for seed 42."""
    c = _record_1787()
    c.preset = "pr1855"
    m = c.model
    m.smear_gate, m.smear_gate_width, m.smear_bos_mask = "gated", 12, True
    m.attn_gate_scale = 0.5
    o = c.optim
    o.beta2 = 0.99
    t = c.train
    t.warmdown_frac = 0.85
    q = c.quant
    q.mlp_clip_sigmas, q.embed_clip_sigmas = 11.5, 14.0
    q.lqer, q.lqer_rank, q.lqer_top_k, q.lqer_asym, q.lqer_group, q.lqer_factor_bits = True, 4, 3, True, 64, 4
    q.compressor, q.group_codec = "pergroup", "zpaq"  # lrzip -z -L 9 in the record (rzip + its own ZPAQ level 3)
    q.byte_shuffle = 0  # _serialize_pergroup: the remainder stream is plain brotli
    tt = c.ttt
    tt.lora_rank, tt.lora_alpha, tt.warm_start_a = 80, 144.0, True
    tt.weight_decay, tt.beta1, tt.beta2 = 0.5, 0.0, 0.99
    tt.chunk_size, tt.batch_size = 48, 64
    tt.phases, tt.prefix_docs = 3, 2500
    return c


def pr430() -> Config:
    """PR #430 (= #824) as actually run: XSA on all 11 layers, bigram 6144, MHA, MLP 3.5, int5 GPTQ.

    The model is the #606 base of the Hedge line (docs/records/hedge-stack.md §1.1-1.2, §4): per-channel SmearGate
    without a BOS mask, BigramHash, VE128 on layers 9-10, per-head scalar gate, lambda_v * x0.
    CROWN-Q (lambda 0.01, int5 steps, from LR multiplier 0.5) is on. Not reproduced: the late int5 STE
    QAT (dead under torch.compile in the original, docs/records/hedge-stack.md §1.2); the Hedge mixer runs in its legal,
    normalised form, so its score is not comparable with the illegal 1.08965.
    """
    c = Config(preset="pr430")
    c.data.shard_end = "splice"  # its DistributedTokenLoader takes from the root's TokenStream (hedge-stack.md §0)
    m = c.model
    m.vocab_size = 1024
    m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult = 11, 512, 8, 8, 3.5
    m.activation, m.leaky_slope = "leaky_relu2", 0.5
    m.init = "orthogonal"
    m.rope_dims, m.rope_ntk_factor = 16, 2.0  # Rotary hard-codes train_seq_len 1024; runs at 2048
    m.qk_gain_init = 1.5
    m.xsa_last_n = 11
    m.ln_scale = True
    m.smear_gate, m.smear_bos_mask = "channel", False
    m.bigram_buckets, m.bigram_dim, m.bigram_scale_init = 6144, 128, 0.05
    m.ve_dim, m.ve_layers, m.ve_scale_init = 128, [9, 10], 0.1
    m.attn_gate = "head_scalar"
    m.value_residual = True
    o = c.optim
    o.matrix_lr, o.tied_embed_lr, o.scalar_lr = 0.025, 0.035, 0.025
    o.muon_momentum, o.muon_momentum_warmup_start, o.muon_momentum_warmup_steps = 0.99, 0.92, 1500
    o.muon_wd = 0.04
    o.beta1, o.beta2 = 0.9, 0.95
    o.adam_wd = o.embed_wd = 0.04
    o.grad_clip_norm = 0.3
    o.ema_decay = 0.997
    t = c.train
    t.train_batch_tokens = 786_432
    t.micro_batch_tokens = 98_304
    t.train_seq_len = t.eval_seq_len = 2048
    t.max_seconds = 600.0
    t.gptq_reserve_seconds = 18.0  # a 582 s loop + 18 s for EMA, calibration and quantisation
    t.warmdown_iters = 3500
    t.export = "none"
    q = c.quant
    q.method = "gptq"
    q.attn_bits = q.mlp_bits = q.other_bits = 5
    q.embed_bits = 8
    q.calibration_batches, q.calibration_seqs = 1, 128
    # the #688 family's quantiser: per-row best-of-5 quantile clip, ascending act-order, 3% pruning
    q.clip_mode, q.act_order_ascending, q.prune_quantile = "quantile", True, 0.03
    q.compressor = "zstd"
    q.byte_shuffle = 0
    c.eval.stride = 64
    tt = c.ttt
    tt.method = "hedge"  # the mixer made legal (normalised experts) on top of score-first TTT
    tt.sgd_chunk_tokens, tt.sgd_epochs, tt.sgd_lr = 32_768, 3, 5e-4
    tt.sgd_params, tt.sgd_optimizer = "last2", "adamw"  # the #688 family: AdamW on the last 2 blocks
    tt.sgd_lr_ramp, tt.sgd_byte_weighted, tt.sgd_polyak, tt.sgd_temperature = 3.0, True, 0.998, 0.98
    c.optim.crown_q_lambda, c.optim.crown_q_clip_range, c.optim.crown_q_below_lr = 0.01, 15, 0.5
    return c


PRESETS: dict[str, Callable[[], Config]] = {
    "baseline": baseline,
    "cpu-smoke": cpu_smoke,
    "pr430": pr430,
    "pr1765": pr1765,
    "pr1784": pr1784,
    "pr1790": pr1790,
    "pr1801": pr1801,
    "pr1855": pr1855,
}


def get_preset(name: str, overrides: list[str] | None = None) -> Config:
    """The preset `name` with `--set` overrides applied."""
    if name not in PRESETS:
        raise PgolfError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]().with_overrides(overrides)
