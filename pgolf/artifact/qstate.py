"""The artifact format: a quantised state, its serialisation, and the way back to a state_dict.

Used by `pgolf quantize` (which fills a qstate) and by everything that loads an artifact (evaluation,
the workbench, the exported record script), so loading never reaches up into the quantisers.

A *qstate* is `{"format", "tensors": {name: entry}}`; every entry records the original `dtype` and
`shape` and one `kind` (docs/records/record-stack.md §4.1-§4.6):
- "quant": int8 values `q` (rows, cols), fp16 row scales `s`, `bits`, optionally `lqer` factors;
- "gate": per-row absmax int8 of an attention-gate weight (same fields as "quant");
- "pass": a float tensor stored fp16 (fp32 for the baseline's control tensors), restored to its dtype;
- "raw": a non-float tensor as it is.
Serialisation: torch.save + one codec (codecs.py), or the per-group container (pergroup.py). The
baseline's int8+zlib blobs (int8.py) load through `load_artifact` as well.
"""
from __future__ import annotations

import io
import pickle

import torch

from pgolf.artifact import codecs as C
from pgolf.artifact import pergroup
from pgolf.artifact.int8 import load_int8
from pgolf.artifact.lowrank import correction
from pgolf.config import QuantConfig
from pgolf.errors import PgolfError, describe

FORMAT = "pgolf_quant_v1"


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 (rows, cols) and fp16 (rows,) -> fp32 (rows, cols)."""
    return q.float() * s.float()[:, None]


# the fields each kind of entry must carry
_FIELDS = {"quant": ("q", "s"), "gate": ("q", "s"), "pass": ("t",), "raw": ("t",)}


def check_qstate(qstate) -> dict:
    """`qstate` if it has the shape of a quantised state, else a PgolfError saying what it holds."""
    if not isinstance(qstate, dict):
        raise PgolfError(f"not a pgolf quantised state (it holds a {type(qstate).__name__})")
    if qstate.get("format") != FORMAT:
        raise PgolfError(f"not a pgolf quantised state (format {qstate.get('format')!r})")
    tensors = qstate.get("tensors")
    if not isinstance(tensors, dict):
        raise PgolfError(f"corrupt quantised state: 'tensors' is a {type(tensors).__name__}, not a dict")
    for name, e in tensors.items():
        need = _FIELDS.get(str(e.get("kind"))) if isinstance(e, dict) else None
        if need is None:
            raise PgolfError(f"corrupt quantised state: entry {name!r} has no known kind")
        missing = [k for k in (*need, "dtype", "shape") if k not in e]
        if missing:
            raise PgolfError(f"corrupt quantised state: entry {name!r} ({e['kind']}) lacks {', '.join(missing)}")
    return qstate


def dequantize_state(qstate: dict) -> dict[str, torch.Tensor]:
    """qstate -> state_dict with the original names, shapes and dtypes."""
    out = {}
    for name, e in check_qstate(qstate)["tensors"].items():
        dtype, shape = getattr(torch, e["dtype"]), e["shape"]
        if e["kind"] in ("raw", "pass"):
            out[name] = e["t"].to(dtype).reshape(shape)
            continue
        w = dequantize(e["q"], e["s"])
        if "lqer" in e:
            w = w + correction(e["lqer"])
        out[name] = w.reshape(shape).to(dtype)
    return out


# ---- serialisation
def serialize(qstate: dict, q: QuantConfig) -> tuple[bytes, dict]:
    """qstate -> (artifact bytes, stream sizes)."""
    if q.compressor == "pergroup":
        return pergroup.pack(qstate, codec=q.group_codec, level=q.level, shuffle=q.byte_shuffle,
                             threads=q.zpaq_threads)
    buf = io.BytesIO()
    torch.save(qstate, buf)
    blob = C.compress(buf.getvalue(), q.compressor, q.level, q.byte_shuffle, q.zpaq_threads)
    return blob, {"stream": len(blob), "codec": C.codec_of(blob)}


def load_qstate(blob: bytes, q: QuantConfig | None = None) -> dict:
    """The quantised state in artifact bytes; `q`: the configuration that wrote them, when it is known
    (then only its container is read; otherwise the per-group magic tells)."""
    if (blob[:4] == pergroup.MAGIC) if q is None else q.compressor == "pergroup":
        return pergroup.unpack(blob)
    try:
        obj = torch.load(io.BytesIO(C.decompress(blob)), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's own text advises unsafe loading
        raise PgolfError(f"corrupt artifact: not a torch.save payload ({type(e).__name__})") from None
    return obj


def load_artifact(blob: bytes, name: str = "artifact", q: QuantConfig | None = None) -> dict[str, torch.Tensor]:
    """Artifact bytes (any pgolf format, including the baseline's int8+zlib) -> state_dict. `q`: the
    quantisation that wrote them, when the caller knows it (the record pipeline reads back its own
    artifact): then only that format is read.

    Whatever is wrong with the bytes, the caller gets one PgolfError naming `name`."""
    try:
        if q is None and blob[:1] == b"\x78":  # a bare zlib stream: the baseline export (int8.py)
            return load_int8(blob)
        return dequantize_state(load_qstate(blob, q))
    except PgolfError as e:
        raise PgolfError(f"{name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated streams, bad pickles, bad headers
        raise PgolfError(f"{name}: corrupt artifact ({describe(e)})") from None
