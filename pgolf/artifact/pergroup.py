"""Per-group compression of the quantised integers (PR #1855 `COMPRESSOR=pergroup`; docs/records/record-stack.md §4.6).

1. The int8 values of the quantised matrices are routed into role groups (tok_emb, c_k, c_q, c_v,
   attn.proj, mlp.fc, mlp.proj, other), layers concatenated in order.
2. In the "hot" groups (tok_emb, c_q, mlp.fc) each matrix's rows are reordered by a greedy L1
   nearest-neighbour chain from row 0, so similar rows sit together; the permutation is stored
   (uint16) with the rest.
3. Each matrix is serialised transposed (column-major).
4. Each group is compressed on its own, the groups in parallel, with `quant.group_codec`. The record
   ran `lrzip -z -L 9`: rzip long-range matching, then ZPAQ context mixing (lrzip's own libzpaq at
   its level 9 / 4 + 1 = 3). pgolf's `zpaq` codec is ZPAQ context mixing in memory, the `zpaq`
   package's method 5 (not the same model); the rzip stage finds repeats hundreds of KB apart, which
   quantised weights do not have (docs/perf.md has the measured sizes).
5. Everything else (scales, permutations, LQER factors, gates, passthrough tensors, shapes) is one
   torch.save stream compressed with brotli (byte-shuffled when `quant.byte_shuffle` > 1; the record
   does not shuffle it, and the pr1855 preset sets 0).
6. Container: b"PGRP" + uint32 stream count + uint32 lengths + the streams (rest first).
"""
from __future__ import annotations

import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.artifact import codecs as C

MAGIC = b"PGRP"
ROLES = ("tok_emb", "c_k", "c_q", "c_v", "attn.proj", "mlp.fc", "mlp.proj", "other")
HOT = ("tok_emb", "c_q", "mlp.fc")
_WORKERS = min(os.cpu_count() or 1, 8)


def role(name: str) -> str:
    if name.startswith("tok_emb."):
        return "tok_emb"
    for r in ("c_k", "c_q", "c_v"):
        if f".attn.{r}." in name:
            return r
    if ".attn.proj." in name:
        return "attn.proj"
    if ".mlp.fc." in name:
        return "mlp.fc"
    if ".mlp.proj." in name:
        return "mlp.proj"
    return "other"


def nn_chain_order(q: torch.Tensor) -> torch.Tensor:
    """Greedy L1 nearest-neighbour chain over the rows of an int8 matrix, starting at row 0: the next
    row is the nearest unvisited one, the lowest row index among equally near rows (as the record's
    `_similarity_sort_l1`, whose argmin runs over the unvisited rows in index order), so the order,
    and the artifact's bytes, are the same on every device.

    O(rows^2 * cols): on CUDA one distance kernel per step (`_chain_torch`); on the CPU uint8
    max-min in numpy (about 4x faster than int16 abs), with visited rows swapped out of the
    candidate block.
    """
    n = q.shape[0]
    if n > 65_535:
        raise PgolfError(f"row reordering stores uint16 permutations; {n} rows is too many")
    if q.is_cuda:
        return _chain_torch(q)
    x = (q.cpu().numpy().astype(np.int16) + 128).astype(np.uint8)
    hi, lo = np.empty_like(x), np.empty_like(x)  # reused buffers: allocation dominated otherwise
    idx = np.arange(n)
    order = [0]
    cur = x[0].copy()
    m = n  # candidates are x[:m]; a visited row is swapped with the last candidate
    x[0], idx[0] = x[m - 1], idx[m - 1]
    m -= 1
    while m > 0:
        a, b = hi[:m], lo[:m]
        np.maximum(x[:m], cur, out=a)
        np.minimum(x[:m], cur, out=b)
        np.subtract(a, b, out=a)  # |x - cur| in uint8
        d = a.sum(axis=1, dtype=np.int32)
        near = np.flatnonzero(d == d.min())  # the swaps disorder the candidates: ties go to the lowest row
        k = int(near[np.argmin(idx[near])]) if near.size > 1 else int(near[0])
        order.append(int(idx[k]))
        cur = x[k].copy()
        x[k], idx[k] = x[m - 1], idx[m - 1]
        m -= 1
    return torch.tensor(order, dtype=torch.int64)


def _chain_torch(q: torch.Tensor) -> torch.Tensor:
    """nn_chain_order in torch on q's device: argmin returns the first of equal minima, the lowest row."""
    n = q.shape[0]
    qi = q.to(torch.int16)
    left = torch.ones(n, dtype=torch.bool, device=q.device)
    order = [0]
    left[0] = False
    for _ in range(n - 1):
        d = (qi - qi[order[-1]]).abs().sum(dim=1, dtype=torch.int32)
        d = torch.where(left, d, torch.iinfo(torch.int32).max)
        nxt = int(torch.argmin(d))
        order.append(nxt)
        left[nxt] = False
    return torch.tensor(order, dtype=torch.int64)


def pack(qstate: dict, *, codec: str = "brotli", level: int = -1, shuffle: int = 0,
         rest_codec: str = "brotli", threads: int = 1) -> tuple[bytes, dict]:
    """qstate (see artifact.py) -> container bytes, and the byte size of every stream."""
    tensors = {k: dict(v) for k, v in qstate["tensors"].items()}  # shallow copies: q is removed
    members: dict[str, list[str]] = {r: [] for r in ROLES}
    for name, e in tensors.items():
        if e["kind"] == "quant":
            members[role(name)].append(name)
    roles = [r for r in ROLES if members[r]]
    hot = [n for r in HOT for n in members[r] if tensors[n]["q"].shape[0] > 1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the chain is O(rows^2 cols): a GPU helps
    with ThreadPoolExecutor(_WORKERS) as pool:  # numpy, CUDA and the codecs release the GIL
        for name, perm in zip(hot, pool.map(lambda n: nn_chain_order(tensors[n]["q"].to(dev)), hot)):
            # rows reordered; the permutation stored as uint16 (as the record), viewed int16 for torch.save
            tensors[name]["q"] = tensors[name]["q"][perm.to(tensors[name]["q"].device)]
            tensors[name]["perm"] = torch.from_numpy(perm.numpy().astype(np.uint16).view(np.int16))
        blobs = {r: b"".join(tensors[n].pop("q").t().contiguous().cpu().numpy().tobytes()  # column-major
                             for n in members[r]) for r in roles}
        rest = {**qstate, "tensors": tensors, "pergroup": {"roles": roles, "members": [members[r] for r in roles]}}
        buf = io.BytesIO()
        torch.save(rest, buf)
        jobs = [(buf.getvalue(), rest_codec, shuffle)] + [(blobs[r], codec, 0) for r in roles]
        streams = list(pool.map(lambda j: C.compress(j[0], j[1], level, j[2], threads), jobs))
    header = MAGIC + struct.pack(f"<I{len(streams)}I", len(streams), *map(len, streams))
    sizes = {"header": len(header), "rest": len(streams[0]),
             "groups": {r: {"bytes": len(s), "members": members[r]} for r, s in zip(roles, streams[1:])}}
    return header + b"".join(streams), sizes


def unpack(blob: bytes) -> dict:
    """Container bytes -> the qstate it was made from (integers back in row-major, original order)."""
    if blob[:4] != MAGIC or len(blob) < 8:
        raise PgolfError("corrupt artifact: PGRP header missing")
    (n,) = struct.unpack_from("<I", blob, 4)
    lens = struct.unpack_from(f"<{n}I", blob, 8)
    pos = 8 + 4 * n
    if pos + sum(lens) != len(blob):
        raise PgolfError(f"corrupt artifact: PGRP streams hold {sum(lens)} bytes, file has {len(blob) - pos}")
    offsets = [pos + sum(lens[:i]) for i in range(n)]
    with ThreadPoolExecutor(_WORKERS) as pool:  # the streams decompress in parallel (as the record)
        streams = list(pool.map(lambda i: C.decompress(blob[offsets[i]:offsets[i] + lens[i]]), range(n)))
    qstate = torch.load(io.BytesIO(streams[0]), map_location="cpu", weights_only=True)
    meta = qstate.pop("pergroup")
    for names, raw in zip(meta["members"], streams[1:]):
        off = 0
        for name in names:
            e = qstate["tensors"][name]
            rows, cols = e["s"].numel(), e["cols"]
            qt = torch.frombuffer(bytearray(raw[off:off + rows * cols]), dtype=torch.int8).reshape(cols, rows)
            off += rows * cols
            q = qt.t().contiguous()
            if "perm" in e:
                perm = torch.from_numpy(e.pop("perm").numpy().view(np.uint16).astype(np.int64))
                q = torch.empty_like(q).index_copy_(0, perm, q)
            e["q"] = q
        if off != len(raw):
            raise PgolfError("corrupt artifact: a PGRP group stream has the wrong length")
    return qstate
