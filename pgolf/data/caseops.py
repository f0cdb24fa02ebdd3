"""CaseOps (`lossless_caps_caseops_v1`, PR #1729, used by #1736-#1855; docs/records/record-stack.md §5.9, §1.4).

A bijective text transform applied before tokenisation: capitals become lowercase letters plus
operator characters, so "The", "the" and "THE" share pieces. Over each maximal run of ASCII letters:
- all lowercase: unchanged;
- two or more letters, all capitals: ALLCAPS + the run in lowercase;
- a capital followed only by lowercase letters: TITLE + the run in lowercase;
- anything else (mixed, or a lone capital): TITLE if the first letter is a capital, then the run in
  lowercase with CAPNEXT before every later letter that was a capital.
An operator character already in the text is written ESC + the character.

The operators are private-use characters, reserved in the tokenizer as user-defined symbols (ids
4-7 after pad/bos/eos/unk). Bits per byte stay on the ORIGINAL text: `original_bytes` gives each
piece the UTF-8 bytes it stands for (operators 0, an escaped character its own length, every
other character its length, case changes being ASCII), written to the `fineweb_val_bytes_*`
sidecars that replace the LUTs when scoring.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from pgolf.errors import PgolfError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAME = "lossless_caps_caseops_v1"


def _is_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _encode_run(word: str) -> str:
    low = word.lower()
    if word == low:
        return word
    if len(word) >= 2 and word == word.upper():
        return ALLCAPS + low
    if word[0].isupper() and len(word) > 1 and word[1:] == low[1:]:
        return TITLE + low
    out = [TITLE + low[0] if word[0].isupper() else low[0]]
    out += [CAPNEXT + c.lower() if c.isupper() else c for c in word[1:]]
    return "".join(out)


def encode(text: str) -> str:
    """The transform (see the module notes)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in OPERATORS:
            out.append(ESC + ch)
            i += 1
        elif _is_letter(ch):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
            out.append(_encode_run(text[i:j]))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def decode(text: str) -> str:
    """The inverse of `encode`; text `encode` cannot have produced is an error."""
    out: list[str] = []
    escaped = capnext = allcaps = in_word = False
    mode = None  # TITLE / ALLCAPS waiting for the next run's first letter
    for ch in text:
        if escaped:
            out.append(ch)
            escaped, in_word, allcaps = False, False, False
            continue
        if ch == ESC:
            escaped = True
        elif ch in (TITLE, ALLCAPS):
            if mode or capnext or in_word:
                raise PgolfError(f"CaseOps: operator U+{ord(ch):04X} inside a word or after another operator")
            mode = ch
        elif ch == CAPNEXT:
            if capnext or mode:
                raise PgolfError("CaseOps: CAPNEXT after another operator")
            capnext = True
        elif _is_letter(ch):
            if not in_word:
                allcaps = mode == ALLCAPS
                out.append(ch.upper() if mode or capnext else ch)
                in_word = True
            else:
                out.append(ch.upper() if allcaps or capnext else ch)
            mode, capnext = None, False
        else:
            if mode or capnext:
                raise PgolfError(f"CaseOps: an operator before {ch!r}, which is not an ASCII letter")
            out.append(ch)
            in_word = allcaps = False
    if escaped or mode or capnext:
        raise PgolfError("CaseOps: the text ends with an unfinished operator")
    return "".join(out)


def _piece_bytes(piece: str, escaped: bool) -> tuple[int, bool]:
    """(original bytes of `piece`, whether it ends waiting for an escaped character), entered in state `escaped`."""
    n = 0
    for ch in piece:
        if escaped:
            n += len(ch.encode("utf-8"))
            escaped = False
        elif ch == ESC:
            escaped = True
        elif ch not in OPERATORS:
            n += len(ch.encode("utf-8"))
    return n, escaped


def original_bytes(pieces: Iterable[str]) -> list[int]:
    """UTF-8 bytes of the original text that each piece's surface stands for (operators count 0,
    an escaped operator its own 3 bytes). The sum over a document's pieces is the UTF-8 length of
    the document before `encode`."""
    counts = []
    escaped = False
    for piece in pieces:
        n, escaped = _piece_bytes(piece, escaped)
        counts.append(n)
    return counts


# an operator, or ESC with the character it escapes (if any): each match is one 3-byte operator that counts 0
_UNCOUNTED = re.compile(f"{ESC}.?|[{TITLE}{ALLCAPS}{CAPNEXT}]", re.S)


def original_length(text: str) -> int:
    """sum(original_bytes([text])) at the regex engine's speed: the UTF-8 length less 3 bytes for every
    operator that is not itself escaped (each is 3 bytes in UTF-8)."""
    return len(text.encode("utf-8")) - 3 * len(_UNCOUNTED.findall(text))


def token_bytes(ids: np.ndarray, surfaces: Sequence[str], boundary: int | None = None) -> np.ndarray:
    """original_bytes([surfaces[i] for i in ids]) by table lookup, for a whole validation split, each
    text restarting after the id `boundary` (BOS), which counts 0.

    A piece's count depends only on whether it starts escaped, and that only after a piece that can end
    waiting for an escaped character (in a CaseOps vocabulary: ESC itself), so only those positions and
    the next are walked in Python."""
    ids = np.asarray(ids, dtype=np.int64)
    table = np.array([[*_piece_bytes(s, False), *_piece_bytes(s, True)] for s in surfaces], dtype=np.int64)
    if boundary is not None:
        table[boundary] = 0
    count0, exit0, count1, exit1 = table.T
    out = count0[ids]
    escaped_after: dict[int, bool] = {}  # position -> whether the next piece starts escaped
    for p in np.flatnonzero((exit0 | exit1)[ids]).tolist():
        entry = escaped_after.get(p - 1, False)
        escaped_after[p] = bool(exit1[ids[p]] if entry else exit0[ids[p]])
        if escaped_after[p] and p + 1 < ids.size:
            out[p + 1] = count1[ids[p + 1]]
    return out
