"""The baseline export: per-row int8 + zlib (root `train_gpt.py`; docs/records/record-stack.md Appendix B).

- float tensors with more than 65,536 elements: int8 per row (2-D and up; flattened to
  (rows, -1)), clipped at the 99.99984th percentile of |w| in the row, scale = clip / 127 stored fp16;
  1-D tensors get one scale for the whole tensor;
- float tensors with at most 65,536 elements: fp16, except control tensors (names matching
  `CONTROL_PATTERNS`), which stay fp32;
- everything else (integer buffers) as-is.
`torch.save` into memory, then zlib level 9. `load_int8` restores every tensor to its original dtype
and shape.
"""
from __future__ import annotations

import io
import pickle
import zlib

import torch

from pgolf.errors import PgolfError
from pgolf.model.gpt import is_control  # one list of control tensors (model, optim, quant)

FORMAT = "pgolf_int8_per_row_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
CLIP_Q = 0.9999984  # 99.99984th percentile of |w| per row
def _row_quantile(a: torch.Tensor, q: float, chunk: int = 4096) -> torch.Tensor:
    """Per-row quantile of a non-negative (rows, cols) fp32 tensor (linear interpolation, as
    `torch.quantile`), chunked over rows because `torch.quantile` refuses > 2^24 elements."""
    out = []
    n = a.shape[1]
    pos = q * (n - 1)
    lo, frac = int(pos), pos - int(pos)
    hi = min(lo + 1, n - 1)
    for i in range(0, a.shape[0], chunk):
        s = a[i:i + chunk].sort(dim=1).values
        out.append(s[:, lo] + frac * (s[:, hi] - s[:, lo]))
    return torch.cat(out) if out else a.new_zeros(0)


def quantize_rows_int8(w: torch.Tensor, clip_q: float = CLIP_Q) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) float -> int8 values and fp16 per-row scales (percentile clip)."""
    w = w.float()
    clip = _row_quantile(w.abs(), clip_q)  # (rows,)
    scale = (clip / 127.0).clamp_min(1.0 / 127.0).half()  # baseline's floor keeps zero rows finite
    s = scale.float()[:, None]
    q = torch.clamp(torch.round(torch.clamp(w, -clip[:, None], clip[:, None]) / s), -127, 127)
    return q.to(torch.int8), scale


def export_int8(state_dict: dict[str, torch.Tensor]) -> bytes:
    """A state_dict -> the baseline's compressed artifact bytes."""
    quantized, scales, passthrough, dtypes, shapes = {}, {}, {}, {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        shapes[name] = list(t.shape)
        if not t.is_floating_point():
            passthrough[name] = t.clone()
        elif t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            passthrough[name] = t.float().clone() if is_control(name) else t.half().clone()
        elif t.ndim >= 2:
            quantized[name], scales[name] = quantize_rows_int8(t.reshape(t.shape[0], -1))
        else:  # one row: the whole vector shares a scale
            q, s = quantize_rows_int8(t.reshape(1, -1))
            quantized[name], scales[name] = q.reshape(-1), s
    obj = {"format": FORMAT, "quantized": quantized, "scales": scales, "passthrough": passthrough,
           "dtypes": dtypes, "shapes": shapes}
    buf = io.BytesIO()
    torch.save(obj, buf)
    return zlib.compress(buf.getvalue(), 9)


def load_int8(blob: bytes) -> dict[str, torch.Tensor]:
    """The artifact bytes -> a state_dict with the original names, shapes and dtypes."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise PgolfError(f"not a pgolf int8 artifact (zlib: {e})") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's own text advises unsafe loading
        raise PgolfError(f"not a pgolf int8 artifact (not a torch.save payload: {type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PgolfError("not a pgolf int8 artifact (format tag missing)")
    out = {}
    for name, dt in obj["dtypes"].items():
        dtype, shape = getattr(torch, dt), obj["shapes"][name]
        if name in obj["quantized"]:
            q, s = obj["quantized"][name], obj["scales"][name].float()
            w = q.float().reshape(s.shape[0], -1) * s[:, None]
            out[name] = w.reshape(shape).to(dtype)
        else:
            out[name] = obj["passthrough"][name].to(dtype).reshape(shape)
    return out
