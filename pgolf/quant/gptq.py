"""Per-row quantisers for weight matrices: round-to-nearest and GPTQ, both with SDClip scales.

A matrix W is (rows = output channels, cols = input channels). For `bits` b the integers lie in
[-R, R] with R = 2^(b-1) - 1, stored one per int8; a row's scale s_r = k * std(W_r) / R is stored
fp16 (SDClip, PR #1394: no clip search, clipping is implicit in clamp(round(w / s), -R, R)).
The #688 family's per-row quantile clip search (docs/records/hedge-stack.md §1.4) is the alternative scale.
GPTQ (Frantar et al. 2022; the records' form, PR #1019/#1394, docs/records/record-stack.md §4.3) quantises columns
in order and feeds each column's error forward through the upper Cholesky factor of H^-1, so the
Hessian-weighted error tr(E H E^T) is lower than rounding each weight on its own.
Everything runs on the tensors' device (CUDA or CPU).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from pgolf.artifact.qstate import dequantize  # noqa: F401 - (q, s) -> weights, one definition

MIN_SCALE = 1e-6  # keeps fp16 scales non-zero for all-zero rows (zero-init projections at init)


def clip_range(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 2 ** (bits - 1) - 1


def sdclip_scale(w: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """(rows, cols) -> fp16 (rows,) scales: k * std(row) / R (SDClip, PR #1394)."""
    std = w.float().std(dim=1) if w.shape[1] > 1 else w.float().abs()[:, 0]
    return (clip_sigmas * std / clip_range(bits)).clamp_min(MIN_SCALE).half()


QUANTILE_CANDIDATES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


def quantile_clip_scale(w: torch.Tensor, bits: int, candidates=QUANTILE_CANDIDATES) -> torch.Tensor:
    """The #688 family's clip (docs/records/hedge-stack.md §1.4): per row, the |w| quantile among `candidates`
    whose round-to-nearest MSE is lowest; scale = clip / R, fp16."""
    R = clip_range(bits)
    a = w.float()
    srt = a.abs().sort(dim=1).values  # (rows, cols)
    n = srt.shape[1]
    best_s, best_err = None, None
    for qt in candidates:
        pos = qt * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        clip = srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])
        sc = (clip / R).clamp_min(MIN_SCALE).half()
        sf = sc.float()[:, None]
        err = ((torch.clamp(torch.round(a / sf), -R, R) * sf - a) ** 2).sum(dim=1)
        if best_s is None:
            best_s, best_err = sc, err
        else:
            assert best_err is not None  # set with best_s
            better = err < best_err
            best_s, best_err = torch.where(better, sc, best_s), torch.where(better, err, best_err)
    assert best_s is not None  # at least one candidate
    return best_s


def quantize_rtn(w: torch.Tensor, bits: int, clip_sigmas: float,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest with the SDClip scale (or a given one): the baseline GPTQ is measured against."""
    R = clip_range(bits)
    s = sdclip_scale(w, bits, clip_sigmas) if scale is None else scale
    q = torch.clamp(torch.round(w.float() / s.float()[:, None]), -R, R)
    return q.to(torch.int8), s


def quantize_absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, s = max|row| / 127: the attention-gate path (PR #1736/#1784)."""
    s = (w.float().abs().amax(dim=1) / 127.0).clamp_min(MIN_SCALE).half()
    q = torch.clamp(torch.round(w.float() / s.float()[:, None]), -127, 127)
    return q.to(torch.int8), s


def _upper_chol_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; retries with more damping if H is numerically not PD."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    extra = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10, 1e-6 * float(H.diagonal().mean()))
    raise RuntimeError("GPTQ: Hessian is not positive definite even after extra damping")


def quantize_gptq(w: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, *, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True, ascending: bool = False,
                  scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one matrix (rows, cols) against its input Hessian H (cols, cols) = E[x x^T].

    Returns int8 values and fp16 per-row scales (SDClip unless `scale` is given), in the original
    column order. `ascending` sorts act-order by ascending diag(H), as the #688 family did.
    """
    with exact_fp32(w.device):
        return _gptq(w, H, bits, clip_sigmas, damp, block_size, act_order, ascending, scale)


def _gptq(w, H, bits, clip_sigmas, damp, block_size, act_order, ascending, scale):
    R = clip_range(bits)
    W = w.float().clone()
    H = H.to(device=W.device, dtype=torch.float32).clone()
    cols = W.shape[1]
    s = sdclip_scale(w, bits, clip_sigmas) if scale is None else scale  # 5. SDClip, from the unmodified rows
    sf = s.float()[:, None]
    # 1. dead columns: inputs that never fire carry no information; their weights are dropped
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    # 2. damping, relative to the mean diagonal
    H.diagonal().add_(damp * H.diagonal().mean())
    # 3. act-order: most-activated inputs first, so their errors can still be compensated
    perm = (torch.argsort(H.diagonal(), descending=not ascending) if act_order
            else torch.arange(cols, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    # 4. upper Cholesky factor of H^-1: row j holds the feedback weights for column j
    U = _upper_chol_of_inverse(H)
    Wt = W.t().contiguous()  # (cols, rows): a column of W is a contiguous row here
    Qt = torch.zeros_like(Wt)
    st = sf[:, 0]
    # 6. lazy-batch updates: exact feedback inside a block, one GEMM for the rest per block
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()  # (b, rows)
        Err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = W1[j]
            q = torch.round(col / st).clamp_(-R, R)
            Qt[i1 + j] = q
            err = (col - q * st) / U1[j, j]
            W1[j:].addr_(U1[j, j:], err, alpha=-1.0)  # feed the error to the later columns
            Err[j] = err
        if i2 < cols:
            Wt[i2:] -= U[i1:i2, i2:].t() @ Err
    # 7. undo the permutation
    Q = Qt.t()[:, torch.argsort(perm)]
    return Q.to(torch.int8), s


_THREADS_LOCK = threading.Lock()
_THREADS_STATE = {"depth": 0, "saved": 1}


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread for GPTQ on the CPU: the column loop's ops are tiny and the matrices
    small, and extra threads only spin (Cholesky was 10x slower with 2 threads on a shared machine).
    Re-entrant and safe when several worker threads quantise at once. No effect on CUDA."""
    if torch.device(device).type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            if _THREADS_STATE["depth"] == 0:
                torch.set_num_threads(_THREADS_STATE["saved"])


@contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """The numerics GPTQ and LQER run under: one thread on the CPU (`one_thread_on_cpu`), and on CUDA
    fp32 matmuls in full precision. The record pipeline turns TF32 on for training, as the records do;
    TF32's 10-bit mantissa in GPTQ's error feedback and in the Hessian's Cholesky products would move
    the integers far from the records', which quantise on the CPU in fp32. Restores the flag after."""
    if torch.device(device).type != "cuda":
        with one_thread_on_cpu(device):
            yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def cpu_workers(device: torch.device) -> int:
    """Matrices are independent: on the CPU, quantise several at once (ops release the GIL)."""
    return min(os.cpu_count() or 1, 8) if torch.device(device).type == "cpu" else 1


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr(E H E^T) with E = W - W_hat: the expected squared output error for inputs with E[xx^T] = H."""
    E = w.float() - w_hat.float()
    return float(((E @ H.float().to(E.device)) * E).sum())
