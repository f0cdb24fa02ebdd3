"""LQER: low-rank correction of the quantisation error (PR #1797 "asym"; docs/records/record-stack.md §4.5).

For the top-k quantised matrices by ||E||_F, E = W - W_hat, a truncated SVD E ~ U_r S_r V_r^T gives
A = U_r S_r (rows, r) and B = V_r^T (r, cols); dequantisation adds A B back
(`pgolf.artifact.lowrank.correction`). Packing (this module; unpacking lives with the artifact format):
- asym (when B.numel() % group == 0): A as INT2 with one fp16 scale max|A| / 1.5 and values in
  {-2, -1, 0, 1}; B as INT4 in groups of `group` over flattened B, s_g = max|B_g| / 7.5, values in
  [-8, 7]; both bit-packed (4 per byte, 2 per byte);
- otherwise the symmetric fallback: A and B each per-row int-`bits` (s = max|row| / R), int8 storage.
"""
from __future__ import annotations

import torch

from pgolf.artifact.lowrank import pack_bits
from pgolf.quant.gptq import MIN_SCALE, one_thread_on_cpu


def factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the error: A = U_r S_r (rows, r), B = V_r^T (r, cols), on E's device.

    The SVD runs on the CPU whatever E's device, as the record's (LAPACK, one thread under torchrun):
    each singular pair's sign is the solver's choice, and asym packing is not sign-symmetric (A's
    INT2 levels are -2..1), so cuSOLVER's choice could store another correction."""
    with one_thread_on_cpu(torch.device("cpu")):
        U, S, Vh = torch.linalg.svd(E.detach().float().cpu(), full_matrices=False)
    r = min(rank, S.numel())
    return (U[:, :r] * S[:r][None, :]).to(E.device), Vh[:r].to(E.device)


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
