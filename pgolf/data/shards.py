"""Challenge token shards: read, write, list, validate.

Format (docs/records/record-stack.md §1.1): a header of 256 little-endian int32 (magic 20240520, version 1,
token count, the rest zero), then the tokens as little-endian uint16. Files are named
`fineweb_{train,val}_XXXXXX.bin`; CaseOps byte sidecars `fineweb_val_bytes_XXXXXX.bin` share the
format and are kept out of the token splits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SPLITS = ("train", "val", "val_bytes")


def write_shard(path: str | Path, tokens) -> Path:
    """Write `tokens` as one shard, atomically."""
    path = Path(path)
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() >= 2**16):
        raise PgolfError(f"{path}: token ids must fit uint16 (got {toks.min()}..{toks.max()})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, toks.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2", copy=False).tobytes())
    return path


def read_header(path: str | Path) -> int:
    """Validate the header and the file size; return the token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise PgolfError(f"{path}: shard not found") from None
    except OSError as e:
        raise PgolfError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise PgolfError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise PgolfError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a challenge shard")
    if header[1] != VERSION:
        raise PgolfError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    if count < 0 or size != HEADER_BYTES + 2 * count:
        raise PgolfError(f"{path}: size {size} bytes does not match the header's {count} tokens "
                         f"(expected {HEADER_BYTES + 2 * max(count, 0)}); truncated or corrupt")
    return count


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens (uint16). With `vocab_size`, reject ids >= vocab_size (a full scan)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap cannot map zero bytes
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        top = int(tokens.max())
        if top >= vocab_size:
            raise PgolfError(f"{path}: token id {top} >= vocab_size {vocab_size} (vocabulary mismatch: "
                             "shards and tokenizer/model come from different vocabularies)")
    return tokens


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """Sorted shard paths of one split: "train", "val", or "val_bytes" (the CaseOps sidecars)."""
    if split not in SPLITS:
        raise PgolfError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    files = sorted(Path(data_dir).glob(f"fineweb_{split}_*.bin"))
    if split != "val_bytes":
        files = [f for f in files if "_bytes_" not in f.name]  # sidecars match fineweb_val_*.bin too
    return files


def load_split(data_dir: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """All shards of a split concatenated into one uint16 array (in memory)."""
    files = list_shards(data_dir, split)
    if not files:
        raise PgolfError(f"{data_dir}: no fineweb_{split}_*.bin shards found")
    return np.concatenate([read_shard(f, vocab_size) for f in files])
