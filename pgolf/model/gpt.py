"""The GPT of the challenge, with every record feature as a config switch.

There is exactly one forward. Training, scoring, GPTQ calibration and test-time training all call
`GPT.forward`; per-document LoRA adapters are applied inside it, where the projections they adapt are
applied, so a feature of the model can never be missing at scoring time (the records lost 0.3-0.8 BPB
to a hand-copied TTT forward that dropped a gate: PR #1784, #1787).

Facts: docs/records/record-stack.md §2 (the #1530 -> #1855 line), Appendix B (the baseline) and
docs/records/hedge-stack.md §1-4 (the #430 line).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.data.segments import segment_ids
from pgolf.errors import PgolfError
from pgolf.model.attention import DocMask, attend, prepare_doc_mask
from pgolf.model.loss import fused_softcap_cross_entropy, softcap_cross_entropy

# Frozen recurrent carry of PR #1801 (leon2k2k2k): learned in a separate run, rounded, frozen.
FROZEN_CARRY_BETA = (1.56, 1.85, 2.13)
FROZEN_CARRY_ALPHA = ((0.23, 0.04, 0.03), (0.13, -0.34, 0.01), (0.06, 0.19, -0.02))

# Control tensors, by name (the records' CONTROL_TENSOR_NAME_PATTERNS, docs/records/record-stack.md §3.2; lambda_v
# and attn_gate from docs/records/hedge-stack.md §4.3): AdamW at scalar_lr whatever their rank, and kept at full
# precision by the baseline export. One list for the optimizer and the quantiser.
CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
    "skip_weight", "skip_weights", "skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas",
    "attn_gate_proj", "attn_gate_w", "attn_gate", "smear_gate", "smear_lambda", "lambda_v",
    "recur_alpha", "carry_alpha", "carry_beta", "ve_scale", "ve_layer_scales", "bigram_scale",
)


def is_control(name: str) -> bool:
    return any(pat in name for pat in CONTROL_PATTERNS)


ATTN_GATES = ("none", "attn_out", "dense", "sparse", "head_scalar")
SMEAR_GATES = ("off", "gated", "channel")


def validate(cfg: ModelConfig) -> None:
    """Reject inconsistent model configs with a message naming the key."""
    def bad(key: str, why: str) -> None:
        raise PgolfError(f"model.{key}: {why}")

    if cfg.model_dim % cfg.num_heads:
        bad("num_heads", f"{cfg.num_heads} does not divide model_dim {cfg.model_dim}")
    if cfg.num_heads % cfg.num_kv_heads:
        bad("num_kv_heads", f"{cfg.num_kv_heads} does not divide num_heads {cfg.num_heads}")
    if int(cfg.mlp_mult * cfg.model_dim) < 1:  # the MLP's hidden width (MLP.__init__)
        bad("mlp_mult", f"{cfg.mlp_mult} x model_dim {cfg.model_dim} leaves the MLP no hidden unit")
    head_dim = cfg.model_dim // cfg.num_heads
    if head_dim % 2:
        bad("num_heads", f"head dim {head_dim} must be even for RoPE")
    if cfg.rope_dims < 0 or cfg.rope_dims > head_dim or cfg.rope_dims % 2:
        bad("rope_dims", f"{cfg.rope_dims} must be even and within [0, {head_dim}]")
    if cfg.attn_gate not in ATTN_GATES:
        bad("attn_gate", f"unknown gate {cfg.attn_gate!r} (choose from {ATTN_GATES})")
    if cfg.attn_gate in ("attn_out", "sparse") and not 0 < cfg.attn_gate_width <= cfg.model_dim:
        bad("attn_gate_width", f"{cfg.attn_gate_width} must be within [1, {cfg.model_dim}]")
    if cfg.attn_gate_input not in ("block", "q"):
        bad("attn_gate_input", f"unknown input {cfg.attn_gate_input!r} (block | q)")
    if cfg.smear_gate not in SMEAR_GATES:
        bad("smear_gate", f"unknown smear gate {cfg.smear_gate!r} (choose from {SMEAR_GATES})")
    if cfg.smear_gate == "gated" and not 0 < cfg.smear_gate_width <= cfg.model_dim:
        bad("smear_gate_width", f"{cfg.smear_gate_width} must be within [1, {cfg.model_dim}]")
    if cfg.activation not in ("relu2", "leaky_relu2"):
        bad("activation", f"unknown activation {cfg.activation!r} (relu2 | leaky_relu2)")
    if cfg.init not in ("default", "orthogonal"):
        bad("init", f"unknown init {cfg.init!r} (default | orthogonal)")
    if cfg.vocab_size > 65536:
        bad("vocab_size", "shards store uint16 tokens: at most 65536")
    if cfg.num_loops:
        if not 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers:
            bad("loop_end", f"loop [{cfg.loop_start}, {cfg.loop_end}] outside {cfg.num_layers} layers")
    if cfg.recur_carry not in ("none", "frozen", "learned"):
        bad("recur_carry", f"unknown carry {cfg.recur_carry!r} (none | frozen | learned)")
    if cfg.recur_carry == "frozen" and cfg.loop_end - cfg.loop_start + 1 != len(FROZEN_CARRY_BETA):
        bad("recur_carry", "the frozen #1801 coefficients are for a 3-layer loop")
    if cfg.recur_carry != "none" and not cfg.num_loops:
        bad("recur_carry", "needs num_loops > 0")
    for layer in cfg.ve_layers:
        if not 0 <= layer < cfg.num_layers:
            bad("ve_layers", f"layer {layer} outside {cfg.num_layers} layers")
    if cfg.parallel_start_layer >= cfg.num_layers:
        bad("parallel_start_layer", f"{cfg.parallel_start_layer} >= num_layers {cfg.num_layers}")
    if cfg.parallel_start_layer >= 0:
        # once the two lanes exist every later decoder slot must run them: a sequential block there would
        # read the stale single stream and its output would be dropped by the final lane mean
        for looping in (False, True):
            order = virtual_layer_order(cfg, looping)
            lanes = [phys >= cfg.parallel_start_layer for phys in order[len(order) // 2:]]
            if True in lanes and not all(lanes[lanes.index(True):]):
                bad("parallel_start_layer", f"{cfg.parallel_start_layer}: a sequential layer would follow the "
                    f"parallel lanes in the virtual order {order}")


def virtual_layer_order(cfg: ModelConfig, looping: bool) -> list[int]:
    """Physical layer index of every virtual layer, e.g. [0,1,2,3,4,5,3,4,5,3,4,5,6,...] looped."""
    if not (looping and cfg.num_loops):
        return list(range(cfg.num_layers))
    loop = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + loop * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, cfg.num_layers))


def rms_norm(x: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    y = F.rms_norm(x, (x.size(-1),))  # weightless RMSNorm, default eps
    # keep_dtype (model.bf16_stream): torch >= 2.12's CUDA autocast returns fp32, the records' 2.9.1 the input's
    return y.to(x.dtype) if keep_dtype else y


class Rotary(nn.Module):
    """(Partial) RoPE: the first `dims` of each head rotate in half-split pairs (i, i + dims/2)."""
    inv_freq: torch.Tensor  # a buffer

    def __init__(self, head_dim: int, dims: int, base: float, ntk_factor: float):
        super().__init__()
        self.dims = dims or head_dim
        if ntk_factor != 1.0:  # NTK-aware base rescaling (the #430 line runs 2048 on a 1024 Rotary)
            base = base * ntk_factor ** (self.dims / (self.dims - 2))
        inv_freq = base ** (-torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed per call (a (T, dims/2) outer product): no cached state for torch.compile to guard
        t = torch.arange(T, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, dims/2)
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x (B, T, H, D); rotate x[..., :dims], pass the rest through
        d = self.dims
        half = d // 2
        cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half:d], x[..., d:]
        out = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
        return torch.cat([out, rest], dim=-1) if rest.size(-1) else out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        d, H, Hkv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.H, self.Hkv, self.D = H, Hkv, d // H
        self.c_q = nn.Linear(d, H * self.D, bias=False)
        self.c_k = nn.Linear(d, Hkv * self.D, bias=False)
        self.c_v = nn.Linear(d, Hkv * self.D, bias=False)
        self.proj = nn.Linear(H * self.D, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((H,), cfg.qk_gain_init))
        self.rotary = Rotary(self.D, cfg.rope_dims, cfg.rope_base, cfg.rope_ntk_factor)
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.gate = cfg.attn_gate
        if self.gate == "attn_out":  # 2*sigmoid(W x[:w]), zero-init -> transparent (PR #1667, #1790)
            self.attn_gate_proj = nn.Linear(cfg.attn_gate_width, H, bias=False)
        elif self.gate == "dense":  # sigmoid(W_g x), full width (Qwen headwise G1; PR #1736)
            self.attn_gate_w = nn.Parameter(torch.zeros(H, d))
        elif self.gate == "sparse":  # sigmoid(c W_g x[:w]) (modded-nanogpt WR #117; PR #1787)
            self.attn_gate_w = nn.Parameter(torch.zeros(H, cfg.attn_gate_width))
        elif self.gate == "head_scalar":  # a plain per-head scale, init 1 (PR #430 "attn_gate")
            self.attn_gate = nn.Parameter(torch.ones(H))

    def forward(self, n: torch.Tensor, *, slot: int, lora, doc_ids, ve: torch.Tensor | None,
                backend: str) -> torch.Tensor:
        B, T, _ = n.shape
        q, k, v = self.c_q(n), self.c_k(n), self.c_v(n)
        if lora is not None:
            q, k, v = lora.add(slot, "q", n, q), lora.add(slot, "k", n, k), lora.add(slot, "v", n, v)
        q_raw = q
        if ve is not None:
            v = v + ve
        q, k, v = q.view(B, T, self.H, self.D), k.view(B, T, self.Hkv, self.D), v.view(B, T, self.Hkv, self.D)
        if self.cfg.qk_norm:
            q, k = rms_norm(q, self.cfg.bf16_stream), rms_norm(k, self.cfg.bf16_stream)
        cos, sin = self.rotary.cos_sin(T, n.device)
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = attend(q, k, v, doc_ids=doc_ids, backend=backend)  # (B, T, H, D)
        if self.xsa:  # exclusive self-attention (PR #478): drop the token's own value direction
            g = self.H // self.Hkv
            vhat = F.normalize(v, dim=-1)[:, :, :, None, :]  # (B, T, Hkv, 1, D)
            yg = y.view(B, T, self.Hkv, g, self.D)
            y = (yg - (yg * vhat).sum(-1, keepdim=True) * vhat).view(B, T, self.H, self.D)
        gate = self._gate(n, q_raw)
        if gate is not None:
            y = y * gate[..., None].to(y.dtype)
        out = self.proj(y.reshape(B, T, self.H * self.D))
        if lora is not None:  # the O adapter reads the block input n (PR #1530)
            out = lora.add(slot, "o", n, out)
        return out

    def _gate(self, n: torch.Tensor, q_raw: torch.Tensor) -> torch.Tensor | None:
        if self.gate == "attn_out":
            src = q_raw if self.cfg.attn_gate_input == "q" else n
            return 2.0 * torch.sigmoid(self.attn_gate_proj(src[..., : self.cfg.attn_gate_width]))
        if self.gate == "dense":
            return torch.sigmoid(F.linear(n, self.attn_gate_w.to(n.dtype)))
        if self.gate == "sparse":
            w = self.attn_gate_w.to(n.dtype)
            return torch.sigmoid(self.cfg.attn_gate_scale * F.linear(n[..., : w.size(1)], w))
        if self.gate == "head_scalar":
            return self.attn_gate.expand(*n.shape[:-1], self.H)
        return None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = nn.Linear(cfg.model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.model_dim, bias=False)
        self.slope = cfg.leaky_slope if cfg.activation == "leaky_relu2" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fc(x)
        h = F.leaky_relu(u, self.slope) if self.slope else F.relu(u)
        return self.proj(h.square())  # ReLU^2 / LeakyReLU(0.5)^2 (PR #549)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d = cfg.model_dim
        self.cfg = cfg
        self.layer = layer
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        if cfg.resid_mix:
            self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        if cfg.value_residual:
            self.lambda_v = nn.Parameter(torch.zeros(()))
        self.ln = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0  # LN scale 1/sqrt(l+1)

    def _mix(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if not self.cfg.resid_mix:
            return x
        m = self.resid_mix.to(x.dtype)
        return m[0] * x + m[1] * x0

    def _attn(self, x_in, *, slot, lora, doc_ids, ve, backend):
        n = rms_norm(x_in, self.cfg.bf16_stream) * self.ln
        return self.attn_scale.to(x_in.dtype) * self.attn(n, slot=slot, lora=lora, doc_ids=doc_ids, ve=ve,
                                                           backend=backend)

    def _mlp(self, x, *, slot, lora):
        n = rms_norm(x, self.cfg.bf16_stream) * self.ln
        out = self.mlp(n)
        if lora is not None:  # the MLP adapter is a bypass from the normalised MLP input
            out = lora.add(slot, "mlp", n, out)
        return self.mlp_scale.to(x.dtype) * out

    def forward(self, x, x0, *, slot, lora, doc_ids, ve, backend):
        x_in = self._mix(x, x0)
        x = x_in + self._attn(x_in, slot=slot, lora=lora, doc_ids=doc_ids, ve=ve, backend=backend)
        x = x + self._mlp(x, slot=slot, lora=lora)
        if self.cfg.value_residual:  # PR #430 "value residual": lambda_v * x0 on the block output
            x = x + self.lambda_v.to(x.dtype) * x0
        return x

    def forward_parallel(self, lane0, lane1, x0, post, resid, *, slot, lora, doc_ids, ve, backend):
        """Two residual lanes (PR #1204/#1412, #1530 form): attention reads lane0, the MLP lane1."""
        a = self._attn(self._mix(lane0, x0), slot=slot, lora=lora, doc_ids=doc_ids, ve=ve, backend=backend)
        m = self._mlp(lane1, slot=slot, lora=lora)
        post, resid = post.to(a.dtype), resid.to(a.dtype)
        new0 = resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m
        new1 = resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m
        if self.cfg.value_residual:
            new0 = new0 + self.lambda_v.to(a.dtype) * x0
            new1 = new1 + self.lambda_v.to(a.dtype) * x0
        return new0, new1


class BigramHash(nn.Module):
    """Hashed (previous, current) token embedding added before the embedding norm (docs/records/hedge-stack.md §2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.buckets = cfg.bigram_buckets
        self.embed = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim)
        self.proj = nn.Linear(cfg.bigram_dim, cfg.model_dim, bias=False)
        self.bigram_scale = nn.Parameter(torch.tensor(cfg.bigram_scale_init))

    def forward(self, idx: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        # bucket_t = ((36313 id_t) XOR (27191 id_{t-1})) mod (B-1); B-1 marks a sequence/document start
        cur = idx.to(torch.int64)
        prev = F.pad(cur[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.buckets - 1)
        h = torch.where(first, torch.full_like(h, self.buckets - 1), h)
        return self.bigram_scale * self.proj(self.embed(h))


class ValueEmbedding(nn.Module):
    """VE: a token table projected to the KV width, added to v on chosen layers (docs/records/hedge-stack.md §1.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kv_dim = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        self.proj = nn.Linear(cfg.ve_dim, kv_dim, bias=False)
        self.ve_scale = nn.Parameter(torch.tensor(cfg.ve_scale_init))
        self.ve_layer_scales = nn.Parameter(torch.ones(len(cfg.ve_layers)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.ve_scale * self.proj(self.embed(idx))


class GPT(nn.Module):
    carry_alpha: torch.Tensor  # buffers of the frozen recurrence carry (recur_carry="frozen")
    carry_beta: torch.Tensor

    def __init__(self, cfg: ModelConfig, *, bos_id: int = 1, attention_backend: str = "sdpa", max_doc_len: int = 0):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.bos_id = bos_id
        self.attention_backend = attention_backend
        # > 0: rows are packed streams (data.segmentation = varlen) whose segments are also cut every
        # max_doc_len tokens from a document's start (pgolf.data.segments); 0: fixed rows
        self.max_doc_len = max_doc_len
        self.looping = False  # depth recurrence is switched on by the trainer (enable_looping_at)
        self.fused_ce = False  # compiled soft-capped CE for CUDA training (scoring always eager)
        d, V, L = cfg.model_dim, cfg.vocab_size, cfg.num_layers
        self.tok_emb = nn.Embedding(V, d)
        if cfg.bigram_buckets:
            self.bigram = BigramHash(cfg)
        if cfg.ve_dim:
            self.ve = ValueEmbedding(cfg)
        if cfg.smear_gate == "gated":  # e_t += lambda * sigmoid(w . e_t[:w]) * e_{t-1} (PR #1667)
            self.smear_gate = nn.Linear(cfg.smear_gate_width, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(()))
        elif cfg.smear_gate == "channel":  # (1 - s) x_t + s x_{t-1}, s = sigmoid(g) per channel (#430)
            self.smear_gate = nn.Parameter(torch.zeros(d))  # type: ignore[assignment]  # the same state-dict name
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(L)])
        n_skip = max(self._num_skips(self.layer_order(False)), self._num_skips(self.layer_order(True)))
        if cfg.unet_skips and n_skip:
            self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
            if cfg.skip_gates:
                self.skip_gates = nn.Parameter(torch.zeros(n_skip, d))
        if cfg.parallel_start_layer >= 0:
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        self.loop_layers = list(range(cfg.loop_start, cfg.loop_end + 1)) if cfg.num_loops else []
        if cfg.recur_carry == "frozen":
            self.register_buffer("carry_beta", torch.tensor(FROZEN_CARRY_BETA))
            self.register_buffer("carry_alpha", torch.tensor(FROZEN_CARRY_ALPHA))
        elif cfg.recur_carry == "learned":  # Recur-Alpha (PR #1766)
            self.recur_alpha = nn.Parameter(torch.zeros(len(self.loop_layers)))
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(d, V, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()
        if cfg.bf16_rounding:
            self.round_to_bf16()
        if cfg.tok_emb_bf16:  # initialised in fp32, stored in bf16 (the records' model.bfloat16())
            self.tok_emb.to(torch.bfloat16)

    # ---- structure
    def physical_blocks(self) -> list[Block]:
        """The blocks in layer order, typed (iterating an nn.ModuleList yields plain Modules)."""
        return list(self.blocks)  # type: ignore[arg-type]

    def layer_order(self, looping: bool | None = None) -> list[int]:
        """Physical layer index of every virtual layer, e.g. [0,1,2,3,4,5,3,4,5,3,4,5,6,...] looped."""
        return virtual_layer_order(self.cfg, self.looping if looping is None else looping)

    def _num_skips(self, order: list[int]) -> int:
        return min(len(order) // 2, len(order) - len(order) // 2) if self.cfg.unet_skips else 0

    def skip_pairs(self, looping: bool | None = None) -> list[tuple[int, int]]:
        """(decoder physical layer, encoder physical layer) of every U-Net skip, in decoder order."""
        order = self.layer_order(looping)
        n_enc = len(order) // 2
        enc, dec = order[:n_enc], order[n_enc:]
        return [(dec[j], enc[n_enc - 1 - j]) for j in range(self._num_skips(order))]

    @property
    def num_slots(self) -> int:
        """Virtual layer slots (LoRA adapters are per slot): the looped depth when looping exists."""
        return max(len(self.layer_order(False)), len(self.layer_order(True)))

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        cfg = self.cfg
        d, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d), "head": (d, cfg.vocab_size)}

    # ---- initialisation (docs/records/record-stack.md §2.11; baseline: nn.Linear defaults, zero O and MLP-down)
    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        for block in self.physical_blocks():
            lins = [block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc]
            for lin in lins:
                if cfg.init == "orthogonal":
                    nn.init.orthogonal_(lin.weight)
                else:
                    lin.reset_parameters()
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
            if hasattr(block.attn, "attn_gate_proj"):
                nn.init.zeros_(block.attn.attn_gate_proj.weight)
            if hasattr(block.attn, "attn_gate_w"):
                if cfg.attn_gate_init_std > 0:
                    nn.init.normal_(block.attn.attn_gate_w, std=cfg.attn_gate_init_std)
                else:
                    nn.init.zeros_(block.attn.attn_gate_w)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if hasattr(self, "bigram"):
            nn.init.zeros_(self.bigram.embed.weight)
            nn.init.zeros_(self.bigram.proj.weight)
        if hasattr(self, "ve"):
            nn.init.normal_(self.ve.embed.weight, std=0.01)
            nn.init.zeros_(self.ve.proj.weight)
        if cfg.smear_gate == "gated":
            nn.init.zeros_(self.smear_gate.weight)
        if hasattr(self, "lm_head"):
            nn.init.zeros_(self.lm_head.weight)

    @torch.no_grad()
    def round_to_bf16(self) -> None:
        """Round the parameters and RoPE's frequencies to bf16 values, each kept in its own dtype: what
        the #1530-line records' `GPT(h).bfloat16()` followed by `restore_fp32_params` leaves, both for
        the model they train and for the one they evaluate (their inv_freq buffer stays bf16 and is read
        back as `.float()`, so RoPE turns at the rounded frequencies)."""
        for t in [*self.parameters(), *(b.attn.rotary.inv_freq for b in self.physical_blocks())]:
            t.copy_(t.to(torch.bfloat16))

    # ---- the one forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, lora=None,
                reduction: str = "mean", mask: DocMask | None = None) -> torch.Tensor:
        """idx (B, T) -> soft-capped fp32 logits (B, T, V), or the CE (mean, or (B, T) per token).
        `mask`: the attention mask prepared outside (see `attention_mask`); None derives it from idx."""
        h = self.hidden(idx, lora=lora, mask=mask)
        logits = self.logits(h, lora=lora)
        if targets is None:
            return self._softcap(logits)
        ce = fused_softcap_cross_entropy if self.fused_ce and self.training else softcap_cross_entropy
        return ce(logits, targets, self.cfg.logit_softcap, reduction=reduction)

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, *, lora=None,
                   mask: DocMask | None = None) -> torch.Tensor:
        """Soft-capped fp32 logits (B, K, V) at `positions` (B, K) of each row only.

        The same forward, with the head applied only where a score is needed (a TTT chunk, the
        stride of a sliding window): at B=64, T=2048, V=8192 the full logits would be 4 GiB."""
        h = self.hidden(idx, lora=lora, mask=mask)  # (B, T, d)
        h = h.gather(1, positions[..., None].expand(-1, -1, h.size(-1)))  # (B, K, d)
        return self._softcap(self.logits(h, lora=lora))

    def attention_mask(self, idx: torch.Tensor) -> DocMask | None:
        """The document mask of rows `idx` in its kernel's form (None when model.doc_mask is off).

        Finding segment starts has a data-dependent size (cu_seqlens, segment groups), so a compiled
        forward gets it from outside the graph (pgolf.model.compile) instead of building it inside."""
        if not self.cfg.doc_mask:
            return None
        ids = segment_ids(idx, self.bos_id, self.max_doc_len)  # (B, T)
        return prepare_doc_mask(ids, self.attention_backend, self.max_doc_len)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap > 0 else logits.float()

    def logits(self, h: torch.Tensor, *, lora=None) -> torch.Tensor:
        """Pre-cap logits from the final normalised hidden state h (B, T, d)."""
        w = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        logits = F.linear(h, w.to(h.dtype))
        if lora is not None:
            logits = lora.add(None, "head", h, logits)
        return logits

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x0: token embedding (+ BigramHash, SmearGate), normalised."""
        cfg = self.cfg
        bos = idx == self.bos_id
        first = torch.zeros_like(bos)
        first[:, 0] = True
        if cfg.smear_bos_mask:  # token mixing never crosses a document boundary (#1851/#1855 fix)
            first = first | bos
        e = self.tok_emb(idx)  # bf16_stream under autocast: the stream keeps the table's dtype (#1530 line)
        if not (cfg.bf16_stream and torch.is_autocast_enabled(idx.device.type)):
            e = e.float()  # else a bf16-stored table (tok_emb_bf16) is read into an fp32 stream
        if hasattr(self, "bigram"):
            e = e + self.bigram(idx, first).to(e.dtype)
        if cfg.smear_gate == "gated":
            w = cfg.smear_gate_width
            g = self.smear_lambda.to(e.dtype) * torch.sigmoid(self.smear_gate(e[..., 1:, :w]))  # (B, T-1, 1)
            prev = e[:, :-1]
            if cfg.smear_bos_mask:
                g = g.masked_fill(bos[:, 1:, None], 0.0)
            e = torch.cat([e[:, :1], e[:, 1:] + g.to(e.dtype) * prev], dim=1)
        x = rms_norm(e, cfg.bf16_stream)
        if cfg.smear_gate == "channel":
            s = torch.sigmoid(self.smear_gate).to(x.dtype)  # type: ignore[arg-type]  # the channel gate's Parameter
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # the previous token at t = 0 is zero
            if cfg.smear_bos_mask:  # a BOS sees no previous token, like position 0
                prev = prev.masked_fill(bos[..., None], 0.0)
            x = (1 - s) * x + s * prev
        return x

    def hidden(self, idx: torch.Tensor, *, lora=None, mask: DocMask | None = None) -> torch.Tensor:
        """The final normalised hidden state (B, T, d): the input of the (tied) head."""
        cfg = self.cfg
        x = x0 = self.embed(idx)
        doc_ids = mask if mask is not None else self.attention_mask(idx)  # built once, shared by every layer
        ve = self.ve(idx).to(x.dtype) if hasattr(self, "ve") else None
        order = self.layer_order()
        n_enc = len(order) // 2
        n_skip = self._num_skips(order)
        skips: list[torch.Tensor] = []
        lanes: tuple[torch.Tensor, torch.Tensor] | None = None
        first_visit: dict[int, torch.Tensor] = {}
        for slot, phys in enumerate(order):
            block: Block = self.blocks[phys]  # type: ignore[assignment]  # (nn.ModuleList yields Modules)
            layer_ve = None
            if ve is not None and phys in cfg.ve_layers:
                layer_ve = self.ve.ve_layer_scales[cfg.ve_layers.index(phys)].to(x.dtype) * ve
            kw = dict(slot=slot, lora=lora, doc_ids=doc_ids, ve=layer_ve, backend=self.attention_backend)
            j = slot - n_enc
            parallel = cfg.parallel_start_layer >= 0 and j >= 0 and phys >= cfg.parallel_start_layer
            if parallel and lanes is None:
                lanes = (x, x)
            if 0 <= j < n_skip:  # U-Net skip from the mirrored encoder layer (PR #289; gates: lerp)
                skip = skips.pop()
                cur = lanes[0] if lanes is not None else x
                w = self.skip_weights[j].to(cur.dtype) * skip
                if cfg.skip_gates:
                    cur = torch.lerp(w, cur, torch.sigmoid(self.skip_gates[j].to(cur.dtype)))
                else:
                    cur = cur + w
                if lanes is not None:
                    lanes = (cur, lanes[1])
                else:
                    x = cur
            if parallel:
                assert lanes is not None  # set above on the first parallel slot
                lanes = block.forward_parallel(*lanes, x0, self.parallel_post_lambdas[phys],
                                               self.parallel_resid_lambdas[phys], **kw)
            else:
                out = block(x, x0, **kw)
                if phys in self.loop_layers and self.looping and cfg.recur_carry != "none":
                    k = self.loop_layers.index(phys)
                    if phys not in first_visit:
                        first_visit[phys] = out.detach() if cfg.recur_carry == "frozen" else out
                    elif cfg.recur_carry == "frozen":  # x <- beta_k Block_k(x) + sum_j alpha_kj c_j (#1801)
                        out = self.carry_beta[k].to(out.dtype) * out
                        for i, p in enumerate(self.loop_layers):  # one term at a time, as #1801 rounds in bf16
                            out = out + self.carry_alpha[k, i].to(out.dtype) * first_visit[p]
                    else:  # x <- Block(x) + alpha_k * first-visit output (#1766)
                        out = out + self.recur_alpha[k].to(out.dtype) * first_visit[phys]
                x = out
            if j < 0:
                skips.append(x)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return rms_norm(x, cfg.bf16_stream)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
