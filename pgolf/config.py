"""One tree of small dataclasses: the whole configuration of a run.

`Config` holds one section per concern (data, model, optim, train, quant, eval, ttt). Presets are
plain functions in `pgolf.presets`; `--set section.key=value` overrides any field by its dotted
path. `to_dict`/`from_dict` round-trip through JSON and reject unknown keys, wrong types and values
outside a field's domain (`pgolf.config_domains`) with a message that names the key. No exec, no
globals, no metaprogramming beyond `dataclasses.fields`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.config_domains import check as check_domains
from pgolf.errors import PgolfError


@dataclass
class DataConfig:
    path: str = "data/sample"  # folder with fineweb_train_*.bin / fineweb_val_*.bin
    tokenizer: str = ""  # SentencePiece .model; "" = <path>/tokenizer.model
    val_max_tokens: int = 0  # 0 = the whole validation split (truncated to whole sequences)
    bos_id: int = 1
    # rows: fixed rows of seq_len tokens (the baseline, #430 line); varlen: each rank's micro-batch is ONE
    # packed row cut at BOS and every seq_len tokens from a document's start, attention per segment, and
    # validation packs eval.batch_seqs sequences per row, dropping the tail (PR #1530; the segments cut
    # attention when model.doc_mask is on)
    segmentation: str = "rows"
    # what the train stream does at a shard's end: step = a span that would cross it drops the remainder,
    # checked once per optimizer step for all micro-steps; micro = the same before each micro-step, the #1530
    # line's DocumentPackingLoader._prepare_batch (differs only with accumulation > 1); splice = a
    # micro-step's span takes the shard's rest and the next shard's start, nothing dropped (the root
    # train_gpt.py's TokenStream.take)
    shard_end: str = "step"


@dataclass
class ModelConfig:
    # --- shape
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    activation: str = "relu2"  # relu2 | leaky_relu2 (LeakyReLU(slope)^2, PR #549)
    leaky_slope: float = 0.5
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    init: str = "default"  # default (nn.Linear) | orthogonal (records); O and MLP-down are zero in both
    # --- attention
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotated dims per head; 0 = the whole head (partial RoPE: 16)
    rope_ntk_factor: float = 1.0  # NTK base rescale: base * f^(d/(d-2)); 2.0 in the #430 line
    qk_norm: bool = True
    qk_gain_init: float = 1.5
    xsa_last_n: int = 0  # exclusive self-attention on the last N physical layers (PR #478)
    attn_gate: str = "none"  # none | attn_out (#1667) | dense (#1736) | sparse (#1787) | head_scalar (#430)
    attn_gate_width: int = 12  # input width of attn_out / sparse gates (24 in #1790)
    attn_gate_input: str = "block"  # block (normalised block input) | q (raw q), attn_out only
    attn_gate_scale: float = 1.0  # c in sigma(c W x[:w]) of the sparse gate
    attn_gate_init_std: float = 0.0  # dense / sparse gate weight init std (0 = zeros)
    doc_mask: bool = False  # attention never crosses a BOS (segments at every BOS and every row)
    tok_emb_bf16: bool = False  # store tok_emb in bf16 (#1530 line: model.bfloat16() keeps only it in bf16)
    # every initial weight and RoPE's inv_freq rounded to bf16 values, kept in their dtypes (#1530 line: the
    # model is built, cast with .bfloat16() and restored to fp32, for training and for evaluation alike)
    bf16_rounding: bool = False
    # under autocast the residual stream keeps tok_emb's dtype (bf16 with tok_emb_bf16), controls are cast to
    # it and RMSNorm returns its input's dtype: the #1530 line's activations (torch 2.9.1); off: an fp32 stream
    bf16_stream: bool = False
    # --- embedding path
    smear_gate: str = "off"  # off | gated (#1667, width-w input) | channel (#430 per-channel)
    smear_gate_width: int = 12
    smear_bos_mask: bool = True  # token mixing (smear, bigram) never crosses a BOS (#1851/#1855)
    bigram_buckets: int = 0  # BigramHash buckets (0 = off)
    bigram_dim: int = 128
    bigram_scale_init: float = 0.05
    ve_dim: int = 0  # value embeddings (0 = off)
    ve_layers: list[int] = field(default_factory=list)
    ve_scale_init: float = 0.1
    # --- structure
    ln_scale: bool = False  # RMSNorm(x) * 1/sqrt(l+1)
    unet_skips: bool = True
    skip_gates: bool = False  # x <- lerp(w*skip, x, sigmoid(g))
    resid_mix: bool = True
    value_residual: bool = False  # x_out += lambda_v * x0 per block (#430, lambda init 0)
    parallel_start_layer: int = -1  # two residual lanes from this physical layer on (-1 = off)
    num_loops: int = 0  # extra passes over [loop_start, loop_end] (depth recurrence)
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.0  # fraction of the training budget after which looping is on
    recur_carry: str = "none"  # none | frozen (#1801 alpha/beta buffers) | learned (#1766)


@dataclass
class OptimConfig:
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied input embedding
    head_lr: float = 0.008  # untied output head
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_coeffs: str = "classic"  # classic (3.4445, -4.7750, 2.0315) | polar_express (PR #1344)
    muon_row_normalize: bool = False  # MuonEq-R (PR #1285)
    muon_wd: float = 0.0
    muon_momentum_bf16: bool = False  # momentum buffer and Nesterov update in bf16 (the records' banked Muon)
    # after the compile warm-up: reset (the optimizer state rolled back) | keep_sharded: on more than one rank
    # the warm-up's momentum stays (#1530 line: the sharded Muon holds it in shard_mom, outside the state
    # train_model restores; on one GPU it is reset there too)
    muon_warmup_momentum: str = "reset"
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0  # control tensors / scalars
    embed_wd: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = off
    # global: clip the gradient averaged over ranks | rank: each rank clips its own (accumulated) gradient,
    # then the clipped gradients are averaged (the #1530-line records: no DDP, clip_grad_norm_ before the
    # optimizers' all-reduce). The same on one process.
    grad_clip_scope: str = "global"
    # average over ranks in bf16: Muon's gradients cast to bf16 first, a bf16 gradient (tok_emb) kept in bf16;
    # the rest in fp32 (#1855: Muon.launch_reduce_scatters, Optimizers.step). No effect on one process.
    grad_reduce_bf16: bool = False
    ema_decay: float = 0.0  # 0 = off; the EMA weights are the ones exported
    # CROWN-Q (#700 and later; docs/records/hedge-stack.md §1.2): lambda/12 * sum mean(w^2 Delta^2) in the warm-down
    crown_q_lambda: float = 0.0  # 0 = off; 0.01 in the records
    crown_q_clip_range: int = 15  # Delta = row max / clip_range (15: int5)
    crown_q_below_lr: float = 0.5  # on once the LR multiplier is below this (the records' late-QAT threshold)


@dataclass
class TrainConfig:
    seed: int = 1337
    train_batch_tokens: int = 524_288  # global tokens per optimizer step
    train_seq_len: int = 1024
    micro_batch_tokens: int = 0  # tokens per rank per forward; 0 = train_batch_tokens / world
    iterations: int = 20_000
    max_seconds: float = 600.0  # wall-clock cap of the training loop (0 = none)
    gptq_reserve_seconds: float = 0.0  # left free inside max_seconds for GPTQ calibration
    warmdown_iters: int = 1200  # linear warm-down over the last N steps (estimated on wall-clock)
    warmdown_frac: float = 0.0  # > 0: warm-down over this fraction of the wall-clock budget instead
    min_lr: float = 0.0  # floor of the LR multiplier during warm-down
    warmup_steps: int = 20  # compile warm-up steps, rolled back afterwards
    val_every: int = 0  # steps between validations (0 = only the final one)
    val_batch_tokens: int = 524_288
    eval_seq_len: int = 1024
    log_every: int = 50
    compile: bool = True  # torch.compile on CUDA (never on CPU)
    attention_backend: str = "auto"  # auto | flash | flex | sdpa
    fused_ce: bool = True  # fused soft-capped CE on CUDA (eager elsewhere)
    export: str = "int8"  # artifact written at the end of training: int8 (baseline) | none


@dataclass
class QuantConfig:
    method: str = "gptq"  # gptq | rtn | int8 (the baseline's per-row int8)
    attn_bits: int = 6
    mlp_bits: int = 6
    embed_bits: int = 8
    other_bits: int = 6
    attn_clip_sigmas: float = 13.0
    mlp_clip_sigmas: float = 12.0
    embed_clip_sigmas: float = 20.0
    other_clip_sigmas: float = 12.85
    calibration_batches: int = 16
    calibration_seqs: int = 48  # sequences per calibration batch
    calibration_seq_len: int = 2048
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    gate_int8: bool = True  # per-row int8 for attention-gate weights
    gate_numel_min: int = 32
    gate_numel_max: int = 8192
    passthrough_numel: int = 65_536  # other float tensors up to this size are stored fp16
    lqer: bool = False
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_asym: bool = True
    lqer_group: int = 64
    lqer_factor_bits: int = 4
    compressor: str = "brotli"  # zlib | lzma | brotli | zstd | zpaq | pergroup | best (fast codecs)
    level: int = -1  # -1 = the compressor's strongest setting
    byte_shuffle: int = 2  # 0 = off
    limit_bytes: int = 16_000_000
    group_codec: str = "brotli"  # pergroup's per-group streams; zpaq = the ZPAQ back end of the record's lrzip -z
    zpaq_threads: int = 1  # blocks per zpaq stream, (de)compressed in parallel: 2 = +0.1% bytes, half the load time
    calibration_seed: int = 0  # RNG of the calibration windows (training shards only)
    calibration_doc_mask: bool = True  # calibration attention segments as model.doc_mask does; false = dense
    # causal over each window, as the #1530-line records' collect_hessians (no cu_seqlens)
    eval_max_tokens: int = 0  # cap on validation tokens when re-scoring the artifact (0 = data.val_max_tokens)
    clip_mode: str = "sdclip"  # sdclip (k * std / R, PR #1394) | quantile (#688: best of 5 |w| quantiles per row)
    act_order_ascending: bool = False  # the #688 family sorted columns by ascending diag(H)
    prune_quantile: float = 0.0  # zero |w| below this quantile of each quantised matrix first (#688: 0.03)


@dataclass
class EvalConfig:
    seq_len: int = 0  # 0 = train.eval_seq_len
    stride: int = 0  # sliding-window stride; 0 = non-overlapping windows
    batch_seqs: int = 32
    # evaluation budget, enforced on the TTT loop (the records' timer): a predicted overrun scores the
    # remaining documents without adaptation (eval.ttt_base.Deadline); 0 = no budget
    max_seconds: float = 600.0
    doc_mask: bool = False  # sliding/windowed scoring: attention never crosses a BOS (on anyway with model.doc_mask)


@dataclass
class TTTConfig:
    method: str = "lora"  # lora | sgd | hedge (what `pgolf eval --ttt` runs)
    # per-document LoRA (PR #1530; #1765 alpha/r and warm-start A)
    lora_rank: int = 96
    lora_alpha: float = 0.0  # 0 = no alpha/r scaling (pre-#1765)
    lora_lr: float = 1e-4
    warm_start_a: bool = False
    beta1: float = 0.0
    beta2: float = 0.999
    eps: float = 1e-10
    weight_decay: float = 0.5
    chunk_size: int = 48
    eval_seq_len: int = 2048
    batch_size: int = 64
    grad_steps: int = 1
    q_lora: bool = True
    k_lora: bool = True
    v_lora: bool = True
    o_lora: bool = True
    mlp_lora: bool = True
    head_lora: bool = True
    # phased global SGD (PR #1610/#1626/#1700)
    phases: int = 0
    prefix_docs: int = 2000
    global_lr: float = 0.001
    global_momentum: float = 0.9
    global_epochs: int = 1
    global_chunk_tokens: int = 32_768
    global_batch_seqs: int = 32
    global_grad_clip: float = 1.0
    # which scored documents phase k trains on: queue = the first `boundary` in queue order (longest
    # first); shortest = the records' rule, scored documents sorted by (length-sorted batch, position)
    phase_select: str = "queue"
    # global SGD's tokens and steps: packed = the documents' own targets, one step per chunk (its short
    # tail a row of its own); record = #1855's train_val_ttt_global_sgd_distributed: the documents from
    # BOS through the next BOS concatenated, whole sequences only, a step per micro-batch, epochs per chunk
    global_procedure: str = "packed"
    # score-first SGD of the #549 / #430 line
    sgd_chunk_tokens: int = 32_768
    sgd_epochs: int = 3
    sgd_lr: float = 0.002
    sgd_momentum: float = 0.9
    sgd_params: str = "all"  # all | last2 (last two blocks + norm/scale/head, #688 family)
    sgd_grad_clip: float = 1.0
    sgd_optimizer: str = "sgd"  # sgd (#549, momentum) | adamw (#688 family: betas 0.9/0.999, no WD)
    # the #688 family's extras (docs/records/hedge-stack.md §6.2; all off = #549)
    sgd_lr_ramp: float = 1.0  # adaptive LR: cosine x (1 + (ramp - 1) min(c / 0.3n, 1)); 3.0 in #688/#430
    sgd_byte_weighted: bool = False  # training CE weighted by each target's bytes
    sgd_polyak: float = 0.0  # EMA decay of the trained parameters, scored from chunk 1 on (0.998)
    sgd_temperature: float = 1.0  # entropy-adaptive: tau = clamp(1 - (1 - T)(1 - H / ln V), 0.9, 1.05); 0.98
    # the legal Hedge mixer (#430 line, normalised)
    hedge_eta: float = 0.1
    hedge_alpha: float = 0.1  # add-alpha smoothing of the count experts
    hedge_trigram_buckets: int = 65_536
    hedge_neural_prior: float = 2.0  # initial log-weight of the neural expert (the others start at 0; #430)


@dataclass
class Config:
    preset: str = "baseline"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "Config":
        cfg = _build(cls, d, where)
        check_domains(cfg, where)  # every numeric field in its domain (pgolf/config_domains.py)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise PgolfError(f"{p}: config file not found") from None
        except json.JSONDecodeError as e:
            raise PgolfError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PgolfError(f"{p}: cannot read the config ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, where=str(p))

    def with_overrides(self, overrides: list[str] | None) -> "Config":
        """A copy with `section.key=value` overrides applied (values parsed as JSON when they parse)."""
        if isinstance(overrides, str):  # a notebook's `overrides = "k=v"`: one string is not a list of them
            raise PgolfError(f"overrides {overrides!r}: expected a list of key=value strings, not one string")
        d = self.to_dict()
        for item in overrides or []:
            if "=" not in item:
                raise PgolfError(f"--set {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            node = d
            parts = key.split(".")
            for i, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    raise PgolfError(f"--set {key}: unknown config key {'.'.join(parts[:i + 1])!r}")
                if i == len(parts) - 1:
                    if isinstance(node[part], dict):
                        raise PgolfError(f"--set {key}: is a section, not a field")
                    node[part] = value
                else:
                    node = node[part]
        return Config.from_dict(d, where="--set")


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check `value` against a field annotation; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, v2 = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(v2)
        return True, out
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v2 = _type_ok(value, arg)
            if ok:
                return True, v2
        return False, value
    if tp is type(None):
        return value is None, value
    raise TypeError(f"unsupported config annotation {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, d: Any, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `d`; errors name the source (`where`) and the dotted key."""
    if not isinstance(d, dict):
        raise PgolfError(f"{where}: key {prefix.rstrip('.') or '<root>'!r} expects an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise PgolfError(f"{where}: unknown config key {prefix + unknown[0]!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp, value, key = hints[f.name], d[f.name], prefix + f.name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, where, key + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise PgolfError(f"{where}: key {key!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
        kwargs[f.name] = coerced
    return cls(**kwargs)


def section_defaults(section: str) -> dict[str, Any]:
    """Default values of one section, e.g. `section_defaults('ttt')`."""
    return dataclasses.asdict(getattr(Config(), section))
