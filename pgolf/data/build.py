"""Documents -> challenge shards + `tokenizer.model` + `manifest.json` in one self-contained folder.

Each document becomes `[BOS] + sp.encode(text)` (no EOS), concatenated back to back as in the
official export (docs/records/record-stack.md §1.2); the first `val_docs` documents are the validation split.
With `caseops=True` every document is CaseOps-transformed first (`pgolf.data.caseops`), the tokenizer
must reserve the four operators (a trained one does), and the validation split gets per-token byte
sidecars `fineweb_val_bytes_*.bin` holding the ORIGINAL bytes of each token (0 for BOS), which scoring
uses instead of the LUTs (docs/records/record-stack.md §1.4).

A build never touches an existing folder until it has succeeded: everything is written into a
temporary sibling that replaces `out` as a whole in one rename at the end (`pgolf.fileio.staged_dir`);
a failed or interrupted build leaves the old folder as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pgolf.data import shards
from pgolf.data.tokenizer import BOS_ID, load_tokenizer, train_tokenizer
from pgolf.errors import PgolfError
from pgolf.fileio import atomic_path, atomic_write_json, check_output, sha256_file, staged_dir

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
MAX_VOCAB = 2 ** 16  # ids are stored as uint16
ENCODE_BATCH = 1024  # documents per sp.encode call


# ---- small file helpers (also used by fetch)
def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def log(msg: str) -> None:
    print(f"pgolf data: {msg}", file=sys.stderr, flush=True)


# ---- reading documents
def read_documents(path: str | Path) -> list[str]:
    """`.jsonl` (one object with a "text" string per line) or `.txt` (documents separated by blank lines)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise PgolfError(f"{path}: expected a .jsonl or .txt file")
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PgolfError(f"{path}: input file not found") from None
    except UnicodeDecodeError as e:
        raise PgolfError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not raw.strip():
        raise PgolfError(f"{path}: empty input file (no documents)")
    if path.suffix == ".txt":
        return [d.strip() for d in re.split(r"\n[ \t]*\n", raw) if d.strip()]
    docs = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PgolfError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise PgolfError(f"{path}:{n}: expected an object with a string field 'text'")
        docs.append(obj["text"])
    return docs


# ---- writing one split as fixed-size shards
class _SplitWriter:
    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.fill = 0
        self.tokens = 0
        self.files: list[Path] = []

    def add(self, toks: np.ndarray) -> None:
        self.buf.append(toks)
        self.fill += toks.size
        self.tokens += toks.size
        while self.fill >= self.shard_tokens:
            flat = np.concatenate(self.buf)
            self._flush(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self.buf, self.fill = [rest], rest.size

    def close(self) -> None:
        if self.fill:
            self._flush(np.concatenate(self.buf))
        self.buf, self.fill = [], 0

    def _flush(self, toks: np.ndarray) -> None:
        path = self.out / f"fineweb_{self.split}_{len(self.files):06d}.bin"
        self.files.append(shards.write_shard(path, toks))


def check_caseops_tokenizer(sp, path) -> None:
    """The four CaseOps operators must be single reserved pieces, or the transform cannot round-trip."""
    from pgolf.data import caseops

    bad = [f"U+{ord(op):04X}" for op in caseops.OPERATORS
           if sp.piece_to_id(op) == sp.unk_id() or sp.encode(op) != [sp.piece_to_id(op)]]
    if bad:
        raise PgolfError(f"{path}: not a CaseOps tokenizer (operators {', '.join(bad)} are not reserved pieces; "
                         "train one with --caseops --vocab-size N)")


def _encode_val_caseops(sp, batch: list[str]) -> list[tuple[list[int], list[int]]]:
    """(ids, original bytes per id) of CaseOps-transformed documents, from the pieces' surfaces."""
    from pgolf.data import caseops

    out = []
    for proto in sp.encode(batch, return_type="proto"):
        pieces = proto.pieces
        out.append(([p.id for p in pieces], caseops.original_bytes(p.surface for p in pieces)))
    return out


def check_out(out: Path) -> None:
    """`--out` must be creatable as a folder, and an existing one must be a data folder (a build
    replaces the folder as a whole, so any other files in it would go)."""
    check_output(out, "--out", kind="dir")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise PgolfError(f"--out {out}: holds files but no {MANIFEST}, so it is not a data folder; a build "
                         "replaces the whole folder: give a new or empty one")


def build_shards(docs: list[str], out: str | Path, *, val_docs: int, tokenizer: str | Path | None = None,
                 vocab_size: int | None = None, shard_tokens: int = 100_000_000,
                 sources: Iterable[dict] = (), caseops: bool = False) -> dict[str, Any]:
    """Encode `docs` into a new folder that then replaces `out`; returns the CLI's result dict."""
    from pgolf.data import caseops as C

    out = Path(out)
    check_out(out)
    if not 1 <= val_docs < len(docs):
        raise PgolfError(f"--val-docs {val_docs}: must be between 1 and {len(docs) - 1} "
                         f"(there are {len(docs)} documents and training needs at least one)")
    if shard_tokens < 1:
        raise PgolfError(f"--shard-tokens {shard_tokens}: must be positive")
    if tokenizer is None and vocab_size is None:
        raise PgolfError("--tokenizer / --vocab-size: give a tokenizer to encode with, "
                         "or a vocabulary size to train one")
    if vocab_size is not None and not 0 < vocab_size <= MAX_VOCAB:
        raise PgolfError(f"--vocab-size {vocab_size}: must be in 1..{MAX_VOCAB} (token ids are stored as uint16)")
    sp = load_tokenizer(tokenizer) if tokenizer is not None else None
    if sp is not None:
        if sp.vocab_size() > MAX_VOCAB:
            raise PgolfError(f"{tokenizer}: vocabulary of {sp.vocab_size()} does not fit uint16 shards")
        if vocab_size is not None and sp.vocab_size() != vocab_size:
            raise PgolfError(f"{tokenizer}: vocabulary size {sp.vocab_size()} != --vocab-size {vocab_size} "
                             "(vocabulary mismatch)")
        if caseops:
            check_caseops_tokenizer(sp, tokenizer)
    if caseops:
        docs = [C.encode(d) for d in docs]
    with staged_dir(out) as tmp:
        res = _write_folder(docs, tmp, sp, tokenizer=tokenizer, vocab_size=vocab_size, val_docs=val_docs,
                            shard_tokens=shard_tokens, sources=sources, caseops=caseops)
    log(f"wrote {res.pop('shards')} shards to {out}")
    return {"out": str(out), "tokenizer": str(out / TOKENIZER), **res}


def _write_folder(docs: list[str], out: Path, sp, *, tokenizer, vocab_size, val_docs: int, shard_tokens: int,
                  sources: Iterable[dict], caseops: bool) -> dict[str, Any]:
    """Tokenizer, shards and manifest into the (new, empty) folder `out`."""
    from pgolf.data import caseops as C

    tok_path = out / TOKENIZER
    if sp is not None:
        copy_atomic(tokenizer, tok_path)  # the data folder carries its own tokenizer
    else:
        log(f"training a {vocab_size}-piece SentencePiece BPE on {len(docs) - val_docs} training documents")
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            model = train_tokenizer(docs[val_docs:], vocab_size, Path(tmp) / "tokenizer",
                                    user_symbols=C.OPERATORS if caseops else ())
            os.replace(model, tok_path)
        sp = load_tokenizer(tok_path)
    vocab = sp.vocab_size()

    writers = {"val": _SplitWriter(out, "val", shard_tokens), "train": _SplitWriter(out, "train", shard_tokens)}
    if caseops:  # the sidecar runs parallel to the val tokens, shard for shard
        writers["val_bytes"] = _SplitWriter(out, "val_bytes", shard_tokens)
    for start in range(0, len(docs), ENCODE_BATCH):
        batch = docs[start:start + ENCODE_BATCH]
        n_val = max(0, min(len(batch), val_docs - start))
        if caseops and n_val:
            encoded = _encode_val_caseops(sp, batch[:n_val])
            for ids, nbytes in encoded:
                writers["val"].add(np.array([BOS_ID] + ids, dtype=np.uint16))
                writers["val_bytes"].add(np.array([0] + nbytes, dtype=np.uint16))
            batch, first = batch[n_val:], start + n_val
        else:
            first = start
        for i, ids in enumerate(sp.encode(batch, out_type=int, num_threads=min(os.cpu_count() or 1, 8))):
            toks = np.empty(len(ids) + 1, dtype=np.uint16)
            toks[0] = BOS_ID
            toks[1:] = ids
            writers["val" if first + i < val_docs else "train"].add(toks)
        log(f"encoded {min(start + ENCODE_BATCH, len(docs))}/{len(docs)} documents")
    for w in writers.values():
        w.close()

    manifest = {
        "format": "pgolf-shards/1",
        "vocab_size": vocab,
        "bos_id": BOS_ID,
        "append_eos": False,
        "text_transform": C.NAME if caseops else None,
        "tokenizer": {"file": TOKENIZER, "sha256": sha256_file(tok_path),
                      "source": None if tokenizer is None else str(tokenizer), "trained": tokenizer is None},
        "documents": {"val": val_docs, "train": len(docs) - val_docs},
        "tokens": {"val": writers["val"].tokens, "train": writers["train"].tokens},
        "shard_tokens": shard_tokens,
        "shards": {f.name: {"tokens": shards.read_header(f), "sha256": sha256_file(f)}
                   for w in writers.values() for f in w.files},
        "sources": list(sources),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return {"train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens, "val_docs": val_docs,
            "train_docs": len(docs) - val_docs, "vocab_size": vocab,
            "text_transform": C.NAME if caseops else None, "shards": len(manifest["shards"])}


def build_from_files(paths: list[str | Path], out: str | Path, **kw) -> dict[str, Any]:
    """build_shards over the documents of .jsonl/.txt files (keyword arguments as build_shards)."""
    check_out(Path(out))  # before reading any input
    docs, sources = [], []
    for p in paths:
        d = read_documents(p)
        docs += d
        sources.append({"path": str(p), "sha256": sha256_file(p), "documents": len(d)})
    return build_shards(docs, out, sources=sources, **kw)


def build_sample(out: str | Path, *, vocab_size: int | None = None, tokenizer: str | Path | None = None,
                 val_docs: int | None = None, shard_tokens: int = 100_000_000, caseops: bool = False) -> dict[str, Any]:
    from pgolf.data.sample import SOURCE, sample_documents

    docs = sample_documents()
    if tokenizer is None and vocab_size is None:
        vocab_size = 1024
    if val_docs is None:
        val_docs = max(1, len(docs) // 10)
    src = {"path": SOURCE, "python": sys.version.split()[0], "documents": len(docs)}
    return build_shards(docs, out, val_docs=val_docs, tokenizer=tokenizer, vocab_size=vocab_size,
                        shard_tokens=shard_tokens, sources=[src], caseops=caseops)


# ---- a data folder and the tokenizer used with it
def require_data_dir(data_dir: str | Path) -> Path:
    """A missing data folder is named as such, not as the first file looked for inside it."""
    if not Path(data_dir).is_dir():
        raise PgolfError(f"{data_dir}: data directory not found (make one with `pgolf data build` or "
                         "`pgolf data fetch`)")
    return Path(data_dir)


def default_tokenizer_path(data_dir: str | Path) -> Path:
    return require_data_dir(data_dir) / TOKENIZER


def check_tokenizer_pairing(data_dir: str | Path, tokenizer_path: str | Path, sp, vocab_size: int | None) -> None:
    """Reject a tokenizer that is not the one the shards were built with, or a model vocabulary
    that differs from the tokenizer's: either would score bytes against the wrong pieces."""
    require_data_dir(data_dir)
    n = sp.vocab_size()
    if vocab_size is not None and vocab_size != n:
        raise PgolfError(f"{tokenizer_path}: tokenizer vocabulary {n} != model vocab_size {vocab_size} "
                         "(vocabulary mismatch)")
    manifest = read_manifest(data_dir)
    if manifest is None:
        return
    path = Path(data_dir) / MANIFEST
    if manifest.get("vocab_size") not in (None, n):
        raise PgolfError(f"{tokenizer_path}: tokenizer vocabulary {n} != {manifest['vocab_size']} that the shards "
                         f"in {data_dir} were built with (vocabulary mismatch)")
    want = (manifest.get("tokenizer") or {}).get("sha256")
    if want and sha256_file(tokenizer_path) != want:
        raise PgolfError(f"{tokenizer_path}: not the tokenizer the shards in {data_dir} were built with "
                         f"(sha256 differs from {path.name})")


# the manifest fields pgolf reads, and the types they may have (None: absent or null)
_MANIFEST_FIELDS = {"format": str, "vocab_size": int, "bos_id": int, "text_transform": str, "tokenizer": dict,
                    "shards": dict, "tokens": dict}


def read_manifest(data_dir: str | Path) -> dict[str, Any] | None:
    """A data folder's `manifest.json` with the fields pgolf reads checked for type (None when the
    folder has none); one PgolfError naming the file and the field otherwise."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PgolfError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(manifest, dict):
        raise PgolfError(f"{path}: holds a JSON {type(manifest).__name__}, expected an object")
    for key, typ in _MANIFEST_FIELDS.items():
        v = manifest.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
            raise PgolfError(f"{path}: {key} is {v!r}, expected {'an' if typ is int else 'a'} {typ.__name__}")
    sha = (manifest.get("tokenizer") or {}).get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise PgolfError(f"{path}: tokenizer.sha256 is {sha!r}, expected a string")
    return manifest
