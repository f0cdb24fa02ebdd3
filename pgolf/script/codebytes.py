"""Code bytes, counted the records' way on the script a configuration exports (docs/records/record-stack.md §4.7).

The records count their whole `train_gpt.py`, training included: minified with python-minifier
(no local renaming, no literal hoisting, literal statements and asserts removed, single-line
preference: PR #1855's flags), compressed with brotli quality 11, base85-encoded inside the two-line
`exec` stub. `measure(source)` counts one script (the record pipeline counts itself with it);
`code_bytes(cfg)` builds the script `cfg` exports (pgolf.script.bundle) and counts it. That is the
`code_bytes` of `pgolf quantize`, the trainer's export, result.json, the registry and the estimates.
It is cached per configuration, pgolf source and minifier/brotli version, in memory and in a small
file cache (`$PGOLF_CACHE`, default ~/.cache/pgolf), so calling it is cheap after the first time.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import brotli

STUB = 'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("{}")))\n'  # as PR #1855's count


def minify(source: str) -> str:
    import python_minifier

    return python_minifier.minify(source, rename_locals=False, hoist_literals=False, remove_literal_statements=True,
                                  remove_asserts=True, prefer_single_line=True)


def wrap(source: str) -> str:
    """The self-extracting stub whose length is the code bytes."""
    return STUB.format(base64.b85encode(brotli.compress(source.encode(), quality=11)).decode())


def unwrap(stub: str) -> str:
    """The inverse of `wrap`: the program inside a stub."""
    packed = stub.split('b85decode("', 1)[1].split('")', 1)[0]
    return brotli.decompress(base64.b85decode(packed)).decode()


@functools.lru_cache(maxsize=8)
def measure(source: str) -> dict[str, int]:
    """code_bytes (the wrapped stub), code_bytes_raw (the readable script), code_bytes_minified.
    (Read-only result: it is cached, since minifying takes seconds.)"""
    small = minify(source)
    return {"code_bytes": len(wrap(small).encode()), "code_bytes_raw": len(source.encode()),
            "code_bytes_minified": len(small.encode())}


_MEMO: dict[str, dict[str, Any]] = {}


def code_bytes(cfg) -> dict[str, Any]:
    """measure() of the script `cfg` exports, plus the pgolf files it holds (`code_files`)."""
    from pgolf.script.bundle import build, script_key
    from pgolf.fileio import atomic_write_json

    h = hashlib.sha256(script_key(cfg).encode())
    for dist in ("python-minifier", "brotli"):  # they decide the count too
        h.update(importlib.metadata.version(dist).encode())
    key = h.hexdigest()[:32]
    if key in _MEMO:
        return dict(_MEMO[key])
    path = Path(os.environ.get("PGOLF_CACHE") or Path.home() / ".cache" / "pgolf") / "code_bytes" / f"{key}.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        script = build(cfg)
        info = {**measure(script.text), "code_files": script.files}
        try:
            atomic_write_json(path, info)
        except OSError:
            pass  # a read-only home: the memory cache still holds it
    _MEMO[key] = info
    return dict(info)


BANNER = "# ---------- "  # pgolf.script.bundle writes one above each module's code
PREAMBLE = "(header and imports)"


def parts(source: str) -> list[tuple[str, str, str]]:
    """(section, name, text) of each top-level statement of a script: `section` is the module its
    banner names (PREAMBLE above the first banner), `name` what the statement defines."""
    import ast

    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    banners = [(i + 1, line[len(BANNER):].rstrip(" -\n")) for i, line in enumerate(lines) if line.startswith(BANNER)]
    out = []
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        section = next((name for line, name in reversed(banners) if line < start), PREAMBLE)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            name = "import " + ", ".join(a.asname or a.name for a in node.names)
        else:
            name = " ".join(ast.unparse(node).split())
            name = name if len(name) <= 40 else name[:39] + "…"
        out.append((section, name, "".join(lines[start - 1:node.end_lineno])))
    return out


def breakdown(source: str, by: str = "module") -> dict[str, Any]:
    """What each part of a script costs in code bytes: the wrapped bytes the script would lose without it.

    Parts are the script's module sections (`by="module"`, the bundle's banners) or its top-level
    statements (`by="definition"`). Each statement is minified alone, so the script is their
    concatenation (`approx_code_bytes`, within a few bytes of `code_bytes`, which measure() counts on
    the whole script); a part's `bytes` is that size less the size of the concatenation without it.
    brotli finds repeats across parts, so the parts' bytes do not add up to the total: a part that
    repeats text held elsewhere costs little, however long. Sorted by cost, dearest first."""
    if by not in ("module", "definition"):
        raise ValueError(f"breakdown by {by!r}: expected 'module' or 'definition'")
    pieces = [(sec, name, minify(text)) for sec, name, text in parts(source)]
    keys = [sec if by == "module" else f"{sec}:{name}" for sec, name, _ in pieces]

    def size(skip: str | None) -> int:
        return len(wrap("\n".join(m for k, (_, _, m) in zip(keys, pieces) if m and k != skip)).encode())

    total = size(None)
    rows: dict[str, dict[str, Any]] = {}
    for k, (sec, name, small) in zip(keys, pieces):
        row = rows.setdefault(k, {"part": k if by == "module" else name, "module": sec, "statements": 0,
                                  "minified": 0})
        row["statements"] += 1
        row["minified"] += len(small.encode())
    for k, row in rows.items():
        row["bytes"] = total - size(k)
    return {**measure(source), "approx_code_bytes": total, "by": by,
            "parts": sorted(rows.values(), key=lambda r: (-r["bytes"], r["part"]))}
