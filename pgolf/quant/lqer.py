"""LQER: low-rank correction of the quantisation error (PR #1797 "asym"; record-stack.md §4.5).

For the top-k quantised matrices by ||E||_F, E = W - W_hat, a truncated SVD E ~ U_r S_r V_r^T gives
A = U_r S_r (rows, r) and B = V_r^T (r, cols); dequantisation adds A B back.
Packing:
- asym (when B.numel() % group == 0): A as INT2 with one fp16 scale max|A| / 1.5 and values in
  {-2, -1, 0, 1}; B as INT4 in groups of `group` over flattened B, s_g = max|B_g| / 7.5, values in
  [-8, 7]; both bit-packed (4 per byte, 2 per byte);
- otherwise the symmetric fallback: A and B each per-row int-`bits` (s = max|row| / R), int8 storage.
"""
from __future__ import annotations

import torch

from pgolf.quant.gptq import MIN_SCALE, one_thread_on_cpu


def factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the error: A = U_r S_r (rows, r), B = V_r^T (r, cols)."""
    with one_thread_on_cpu(E.device):
        U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    r = min(rank, S.numel())
    return U[:, :r] * S[:r][None, :], Vh[:r]


# ---- bit packing of small signed integers (two's complement in `bits` bits)
def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int values in [-2^(b-1), 2^(b-1)) -> uint8, 8/b values per byte (zero-padded at the end)."""
    per = 8 // bits
    u = (q.flatten().to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    pad = (-u.numel()) % per
    u = torch.cat([u, u.new_zeros(pad)]).reshape(-1, per)
    out = torch.zeros(u.shape[0], dtype=torch.uint8, device=u.device)
    for i in range(per):
        out |= u[:, i] << (bits * i)
    return out


def unpack_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: n signed values as int8."""
    per, mask = 8 // bits, (1 << bits) - 1
    u = torch.stack([(p >> (bits * i)) & mask for i in range(per)], dim=1).flatten()[:n].to(torch.int16)
    return torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u).to(torch.int8)


# ---- packing of the factors
def pack(A: torch.Tensor, B: torch.Tensor, *, asym: bool = True, group: int = 64,
         bits: int = 4) -> dict[str, object]:
    """Quantise and pack the factors into a dict of tensors (what the artifact stores)."""
    if asym and B.numel() % group == 0:
        sa = (A.abs().max() / 1.5).clamp_min(MIN_SCALE).half()
        qa = torch.clamp(torch.round(A / sa.float()), -2, 1)
        Bg = B.reshape(-1, group)
        sb = (Bg.abs().amax(dim=1) / 7.5).clamp_min(MIN_SCALE).half()
        qb = torch.clamp(torch.round(Bg / sb.float()[:, None]), -8, 7)
        return {"mode": "asym", "a": pack_bits(qa, 2), "sa": sa, "b": pack_bits(qb, 4), "sb": sb,
                "a_shape": list(A.shape), "b_shape": list(B.shape)}
    R = 2 ** (bits - 1) - 1  # symmetric fallback (e.g. B.numel() not a multiple of the group)
    out: dict[str, object] = {"mode": "sym", "a_shape": list(A.shape), "b_shape": list(B.shape)}
    for key, M in (("a", A), ("b", B)):
        s = (M.abs().amax(dim=1) / R).clamp_min(MIN_SCALE).half()
        out[key] = torch.clamp(torch.round(M / s.float()[:, None]), -R, R).to(torch.int8)
        out["s" + key] = s
    return out


def unpack(p: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised factors (A, B) in fp32."""
    a_shape, b_shape = p["a_shape"], p["b_shape"]
    if p["mode"] == "asym":
        na, nb = a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]
        A = unpack_bits(p["a"], 2, na).float().reshape(a_shape) * p["sa"].float()
        qb = unpack_bits(p["b"], 4, nb).float().reshape(-1, nb // p["sb"].numel())
        B = (qb * p["sb"].float()[:, None]).reshape(b_shape)
        return A, B
    A = p["a"].float() * p["sa"].float()[:, None]
    B = p["b"].float() * p["sb"].float()[:, None]
    return A, B


def correction(p: dict[str, object]) -> torch.Tensor:
    A, B = unpack(p)
    return A @ B
