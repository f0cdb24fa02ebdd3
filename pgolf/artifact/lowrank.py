"""The stored form of LQER factors (PR #1797 "asym"; docs/records/record-stack.md §4.5): bit unpacking and the
low-rank correction A B that dequantisation adds back. The encoder is `pgolf.quant.lqer.pack`.

- asym: A as INT2 (one fp16 scale, values {-2, -1, 0, 1}), B as INT4 in groups over flattened B
  (one fp16 scale per group, values [-8, 7]); both bit-packed (4 and 2 values per byte);
- sym: A and B per-row int-`bits` in int8 storage with fp16 row scales.
"""
from __future__ import annotations

from typing import Any

import torch


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


def unpack(p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
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


def correction(p: dict[str, Any]) -> torch.Tensor:
    A, B = unpack(p)
    return A @ B
