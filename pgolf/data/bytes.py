"""Bytes per token, the challenge's way (docs/records/record-stack.md §1.4): the scoring lookup tables and the audit
that checks them against the decoded text.

A target's bytes come from its SentencePiece piece: boundary tokens (control / unknown / unused, e.g.
BOS) count 0, byte-fallback pieces 1, any other piece the UTF-8 length of its text with one leading
`▁` removed, plus 1 for that `▁` (a space) unless the previous token is a boundary (a document's
first piece after BOS). With CaseOps the per-token byte sidecars (`fineweb_val_bytes_*.bin`) replace
the tables. `pgolf.eval.bpb` turns these counts into bits per byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.data import shards
from pgolf.data.build import check_tokenizer_pairing, default_tokenizer_path, read_manifest
from pgolf.data.tokenizer import BOS_ID, load_tokenizer
from pgolf.errors import PgolfError

SPACE = "\u2581"  # SentencePiece's word-boundary marker


@dataclass
class Luts:
    base_bytes: torch.Tensor  # (V,) int16
    has_leading_space: torch.Tensor  # (V,) bool
    is_boundary: torch.Tensor  # (V,) bool

    def to(self, device) -> "Luts":
        return Luts(self.base_bytes.to(device), self.has_leading_space.to(device), self.is_boundary.to(device))


def build_luts(sp, vocab_size: int) -> Luts:
    """Tables over `vocab_size` ids; ids past the tokenizer's vocabulary (padding) are boundaries."""
    n = sp.vocab_size()
    if vocab_size < n:
        raise PgolfError(f"vocab_size {vocab_size} < tokenizer vocabulary {n} (vocabulary mismatch)")
    base = np.zeros(vocab_size, dtype=np.int16)
    lead = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1  # one raw byte, whatever the piece's "<0xAB>" spelling
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return Luts(torch.from_numpy(base), torch.from_numpy(lead), torch.from_numpy(boundary))


def target_bytes(prev_tokens, targets, luts: Luts) -> torch.Tensor:
    """Bytes of each target given the token before it (same shapes); int16 on the tables' device."""
    x, y = _as_long(prev_tokens), _as_long(targets)
    space = luts.has_leading_space[y] & ~luts.is_boundary[x]
    return luts.base_bytes[y] + space.to(luts.base_bytes.dtype)


def _as_long(a) -> torch.Tensor:
    if isinstance(a, np.ndarray):  # uint16 shards have no torch dtype
        return torch.from_numpy(a.astype(np.int64))
    return torch.as_tensor(a).long()


def audit(data_dir: str | Path, tokenizer_path: str | Path | None = None, bos_id: int = BOS_ID) -> dict:
    """Validation bytes two ways over the whole split: the scoring tables, and the UTF-8 length of
    each document decoded by the tokenizer. They agree when the tables are right."""
    tok_path = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path(data_dir)
    sp = load_tokenizer(tok_path)
    check_tokenizer_pairing(data_dir, tok_path, sp, None)
    val = shards.load_split(data_dir, "val", sp.vocab_size()).astype(np.int64)
    luts = build_luts(sp, sp.vocab_size())
    lut_bytes = int(target_bytes(val[:-1], val[1:], luts).sum())
    # documents = the spans between BOS markers (a prefix before the first BOS is decoded as well)
    cuts = np.flatnonzero(val == bos_id)
    bounds = np.concatenate([[0], cuts, [val.size]])
    docs = [val[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    from pgolf.data import caseops

    transform = _text_transform(data_dir)
    decoded = 0
    for i in range(0, len(docs), 1024):  # batches keep the Python lists small
        texts = sp.decode([d[d != bos_id].tolist() for d in docs[i:i + 1024]])
        if transform == caseops.NAME:  # the bytes the text had before the transform: operators are 0
            decoded += sum(map(caseops.original_length, texts))
        else:
            decoded += sum(len(t.encode("utf-8")) for t in texts)
    out = {"val_tokens": int(val.size), "lut_bytes": lut_bytes, "decoded_bytes": decoded,
           "match": lut_bytes == decoded, "val_docs": int(cuts.size), "tokenizer": str(tok_path),
           "text_transform": transform}
    if shards.list_shards(data_dir, "val_bytes"):
        # CaseOps: the sidecar is what scores, and it must count the original text's bytes (the LUTs count
        # the transformed pieces, operators included: the #2071 pitfall). It counts each piece's surface in
        # the raw text, runs of whitespace included, which the tokenizer's normaliser collapses (and NFKC
        # may change a character): so the totals differ by the corpus's whitespace runs, which can be
        # percents. Token by token the sidecar must give the piece's own bytes, or more where the piece
        # opens with a space (a run); 0.1% of them may differ otherwise (NFKC).
        side = shards.load_split(data_dir, "val_bytes").astype(np.int64)
        is_byte = np.array([sp.is_byte(i) for i in range(sp.vocab_size())])
        text = [" " if is_byte[i] else sp.id_to_piece(i).replace(SPACE, " ") for i in range(sp.vocab_size())]
        want = caseops.token_bytes(val, text, boundary=bos_id)  # BOS: no bytes, no escape carried across
        # a character split into byte pieces is one unit: its surface is the last piece's
        byte = is_byte[val]
        unit = np.cumsum(np.r_[True, ~(byte[1:] & byte[:-1])]) - 1
        first = np.flatnonzero(np.r_[True, np.diff(unit) > 0])
        got, exp = np.bincount(unit, side), np.bincount(unit, want)
        run = (got > exp) & np.array([t.startswith(" ") for t in text])[val[first]]
        odd = int(((got != exp) & ~run).sum())
        out.update(sidecar_bytes=int(side[1:].sum()), normalisation_delta_bytes=int(side[1:].sum()) - decoded,
                   whitespace_run_bytes=int((got - exp)[run].sum()), mismatched_tokens=odd,
                   match=odd <= 1e-3 * first.size)
    return out


def _text_transform(data_dir: str | Path) -> str | None:
    return (read_manifest(data_dir) or {}).get("text_transform")
