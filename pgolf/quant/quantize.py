"""A state_dict -> a quantised state (pgolf.artifact.qstate's format), and byte accounting
(docs/records/record-stack.md §4.1-§4.6).

Every entry of the qstate records the original `dtype` and `shape` and one `kind`:
- "quant": a matrix (2-D or more, flattened to rows) with more than `passthrough_numel` elements:
  int8 values `q` (rows, cols), fp16 row scales `s`, `bits`, and optionally `lqer` factors;
  GPTQ when the tensor has a Hessian and method is "gptq", else round-to-nearest (SDClip); method
  "int8" is the baseline's percentile-clipped per-row int8;
- "gate": attention-gate weights (`attn_gate_w`, numel 32-8192), per-row absmax int8 (PR #1736/#1784);
  checked before the passthrough rule, or an 8x12 sparse gate silently falls back to fp16 (§7.9);
- "pass": other float tensors, stored fp16 (fp32 for the baseline's control tensors), restored to
  their dtype on load;
- "raw": non-float tensors as they are.
Serialising and loading are the artifact format's (`pgolf.artifact.qstate.serialize` / `load_artifact`).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pgolf.artifact import codecs as C
from pgolf.artifact import pergroup
from pgolf.artifact.int8 import is_control, quantize_rows_int8
from pgolf.artifact.qstate import FORMAT, dequantize
from pgolf.config import QuantConfig
from pgolf.errors import PgolfError
from pgolf.quant import lqer
from pgolf.quant.gptq import (cpu_workers, exact_fp32, quantile_clip_scale, quantize_absmax_int8,
                              quantize_gptq, quantize_rtn)

GROUPS = ("attn", "mlp", "embed", "other")
GATE_PATTERNS = ("attn_gate_w",)  # dense (#1736) and sparse (#1787) gates; attn_gate_proj stays fp16


def tensor_group(name: str) -> str:
    """Which bits / clip-multiplier group a matrix belongs to."""
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    if name.startswith(("tok_emb.", "lm_head.")) or ".embed." in name:
        return "embed"
    return "other"


def classify(name: str, t: torch.Tensor, q: QuantConfig) -> str:
    if not t.is_floating_point():
        return "raw"
    if (q.gate_int8 and t.ndim == 2 and any(p in name for p in GATE_PATTERNS)
            and q.gate_numel_min <= t.numel() <= q.gate_numel_max):
        return "gate"
    if t.ndim < 2 or t.numel() <= q.passthrough_numel:
        return "pass"
    return "quant"


def group_setting(q: QuantConfig, group: str) -> tuple[int, float]:
    return getattr(q, f"{group}_bits"), getattr(q, f"{group}_clip_sigmas")


def _quantize_matrix(name: str, t: torch.Tensor, kind: str, q: QuantConfig, H: torch.Tensor | None,
                     device: torch.device) -> tuple[dict, dict, float | None]:
    """One matrix -> (entry fields, info, ||W - W_hat||_F for LQER or None)."""
    w = w0 = t.to(device).float().reshape(t.shape[0], -1)
    err = None
    if kind == "gate":
        qq, s, method, bits = *quantize_absmax_int8(w), "absmax_int8", 8
    elif q.method == "int8":
        qq, s, method, bits = *quantize_rows_int8(w), "int8_percentile", 8
    else:
        bits, k = group_setting(q, tensor_group(name))
        if q.prune_quantile > 0:  # magnitude pruning before quantisation (#688 family: 3rd percentile)
            cut = w.abs().flatten().kthvalue(max(1, int(q.prune_quantile * w.numel()))).values
            w = torch.where(w.abs() < cut, torch.zeros_like(w), w)
        if q.clip_mode not in ("sdclip", "quantile"):
            raise PgolfError(f"quant.clip_mode {q.clip_mode!r}: expected sdclip or quantile")
        scale = quantile_clip_scale(w, bits) if q.clip_mode == "quantile" else None
        if q.method == "gptq" and H is not None and H.shape == (w.shape[1], w.shape[1]):
            qq, s = quantize_gptq(w, H.to(device), bits, k, damp=q.damp, block_size=q.block_size,
                                  act_order=q.act_order, ascending=q.act_order_ascending, scale=scale)
            method = "gptq"
        else:  # RTN baseline, or a matrix without a Hessian (never seen by calibration)
            qq, s = quantize_rtn(w, bits, k, scale=scale)
            method = "rtn"
        err = float((w0 - dequantize(qq, s)).norm())
    fields = {"q": qq.cpu(), "s": s.cpu(), "bits": bits, "cols": w.shape[1]}
    return fields, {"kind": kind, "method": method, "bits": bits, "group": tensor_group(name)}, err


def validate(q: QuantConfig) -> None:
    """Reject a QuantConfig that cannot work, before any Hessian or score is computed."""
    def bad(key: str, why: str) -> None:
        raise PgolfError(f"quant.{key}: {why}")

    if q.method not in ("gptq", "rtn", "int8"):
        bad("method", f"{q.method!r}: expected gptq, rtn or int8")
    for key in ("attn_bits", "mlp_bits", "embed_bits", "other_bits"):
        if not 2 <= getattr(q, key) <= 8:
            bad(key, f"{getattr(q, key)} bits: expected 2..8")
    for key in ("attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas", "other_clip_sigmas"):
        if getattr(q, key) <= 0:
            bad(key, f"{getattr(q, key)}: must be > 0")
    if q.clip_mode not in ("sdclip", "quantile"):
        bad("clip_mode", f"{q.clip_mode!r}: expected sdclip or quantile")
    if q.block_size < 1 or q.damp < 0:
        bad("block_size" if q.block_size < 1 else "damp", "must be positive")
    if not 0 <= q.byte_shuffle <= 255:
        bad("byte_shuffle", f"{q.byte_shuffle}: expected 0 (off) or a stride in 1..255")
    if q.compressor not in (*C.CODECS, "best", "pergroup"):
        bad("compressor", f"{q.compressor!r}: expected one of {', '.join(C.CODECS)}, best, pergroup")
    if q.group_codec not in C.CODECS:
        bad("group_codec", f"{q.group_codec!r}: expected one of {', '.join(C.CODECS)}")
    if not 1 <= q.zpaq_threads <= 64:
        bad("zpaq_threads", f"{q.zpaq_threads}: expected 1..64 blocks per zpaq stream")
    if "zpaq" in (q.compressor, q.group_codec if q.compressor == "pergroup" else ""):
        try:
            C.zpaq_module()
        except PgolfError:
            bad("group_codec" if q.compressor == "pergroup" else "compressor", C.ZPAQ_MISSING)
    if q.lqer:
        if q.lqer_rank < 1 or q.lqer_top_k < 0 or q.lqer_group < 1:
            bad("lqer_rank", "LQER needs rank >= 1, top_k >= 0 and group >= 1")
        if not 2 <= q.lqer_factor_bits <= 8:
            bad("lqer_factor_bits", f"{q.lqer_factor_bits}: expected 2..8")


def quantize_state_dict(sd: dict[str, torch.Tensor], q: QuantConfig,
                        hessians: dict[str, torch.Tensor] | None = None,
                        device: str | torch.device | None = None) -> tuple[dict, dict]:
    """state_dict -> (qstate, info). info: per-tensor method/bits, LQER choices, timings."""
    validate(q)
    hessians = hessians or {}
    device = torch.device(device or "cpu")
    tensors: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {"tensors": {}, "lqer": []}
    jobs: list[tuple[str, torch.Tensor, str]] = []
    t0 = time.perf_counter()
    for name, t in sd.items():
        t = t.detach()
        kind = classify(name, t, q)
        tensors[name] = {"kind": kind, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        if kind == "raw":
            tensors[name]["t"] = t.cpu().clone()
        elif kind == "pass":
            keep32 = q.method == "int8" and is_control(name)  # the baseline keeps control tensors fp32
            tensors[name]["t"] = t.cpu().float().clone() if keep32 else t.cpu().half().clone()
        else:
            jobs.append((name, t, kind))
    errors: dict[str, float] = {}
    with exact_fp32(device), ThreadPoolExecutor(cpu_workers(device)) as pool:
        # (mypy types a lambda's argument as Any here, and *Any could fill every parameter)
        results = pool.map(lambda j: _quantize_matrix(*j, q, hessians.get(j[0]), device), jobs)  # type: ignore[call-arg]
        for (name, _t, _kind), (fields, tinfo, err) in zip(jobs, results):
            tensors[name].update(fields)
            info["tensors"][name] = tinfo
            if err is not None:
                errors[name] = err
    info["quantize_seconds"] = time.perf_counter() - t0
    if q.lqer and q.lqer_rank > 0 and q.lqer_top_k > 0 and errors:
        t0 = time.perf_counter()
        # LQER, PR #1797: correct the k matrices with the largest ||W - W_hat||_F
        for name in sorted(errors, key=errors.__getitem__, reverse=True)[:q.lqer_top_k]:
            e = tensors[name]
            w = sd[name].detach().to(device).float().reshape(e["shape"][0], -1)
            A, B = lqer.factors(w - dequantize(e["q"].to(device), e["s"].to(device)), q.lqer_rank)
            packed = lqer.pack(A, B, asym=q.lqer_asym, group=q.lqer_group, bits=q.lqer_factor_bits)
            e["lqer"] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
            info["lqer"].append({"name": name, "mode": packed["mode"], "error_norm": errors[name]})
        info["lqer_seconds"] = time.perf_counter() - t0
    return {"format": FORMAT, "tensors": tensors}, info


# ---- accounting
def _entry_bytes(e: dict) -> dict[str, bytes]:
    """The raw payload of one entry, split by what it is (values, scales, LQER)."""
    if e["kind"] in ("raw", "pass"):
        return {"values": e["t"].numpy().tobytes()}
    out = {"values": e["q"].numpy().tobytes(), "scales": e["s"].numpy().tobytes()}
    if "lqer" in e:
        out["lqer"] = b"".join(v.numpy().tobytes() for v in e["lqer"].values() if isinstance(v, torch.Tensor))
    return out


def report_group(name: str, e: dict) -> str:
    """The row of the byte report an entry's values belong to."""
    if e["kind"] == "quant":
        return tensor_group(name)
    return {"gate": "gate", "pass": "passthrough", "raw": "passthrough"}[e["kind"]]


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` bytes in proportion to `weights` (largest remainder), summing exactly to total."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        out = {k: 0 for k in weights}
        if weights:
            out[next(iter(weights))] = total
        return out
    raw = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[:total - sum(out.values())]:
        out[k] += 1
    return out


def byte_report(qstate: dict, blob: bytes, streams: dict) -> dict:
    """Bytes per tensor group that sum exactly to len(blob), params and bits per parameter.

    With one compressed stream the split is an attribution: each group's payload is compressed on
    its own with zstd level 3 and the file's bytes are shared in proportion. With pergroup, the
    integer streams are exact and only the "rest" stream is attributed. Container headers, the codec
    tag and (pergroup) the header are reported as "container".
    """
    import zstandard

    fast = zstandard.ZstdCompressor(level=3)
    payload: dict[str, list[bytes]] = {}
    params: dict[str, int] = {}
    pergroup_mode = blob[:4] == pergroup.MAGIC
    for name, e in qstate["tensors"].items():
        g = report_group(name, e)
        n = 1
        for d in e["shape"]:
            n *= d
        if e["kind"] != "raw":
            params[g] = params.get(g, 0) + n
        for part, data in _entry_bytes(e).items():
            key = "lqer" if part == "lqer" else g
            if pergroup_mode and part == "values" and e["kind"] == "quant":
                continue  # these bytes live in the exact group streams
            payload.setdefault(key, []).append(data)
    est = {k: float(len(fast.compress(b"".join(v)))) for k, v in payload.items()}
    if pergroup_mode:
        out = {"container": streams["header"]}
        for k, v in _allocate(streams["rest"], est).items():
            out[k] = out.get(k, 0) + v
        for stream in streams["groups"].values():  # exact; a mixed "other" stream is split by numel
            numel: dict[str, float] = {}
            for name in stream["members"]:
                g = tensor_group(name)
                numel[g] = numel.get(g, 0) + qstate["tensors"][name]["q"].numel()
            for g, v in _allocate(stream["bytes"], numel).items():
                out[g] = out.get(g, 0) + v
    else:
        out = {"container": 1}  # the codec tag byte
        out.update(_allocate(len(blob) - 1, est))
    assert sum(out.values()) == len(blob)
    total_params = sum(params.values())
    return {
        "bytes_by_group": out,
        "params_by_group": params,
        "params": total_params,
        "bits_per_param": 8 * len(blob) / max(total_params, 1),
        "bits_per_param_by_group": {g: 8 * out.get(g, 0) / n for g, n in params.items() if n},
    }

