"""Byte codecs for the artifact: zlib, lzma, brotli, zstd, zpaq, byte shuffling, and "best".

`compress(data, codec, level, shuffle)` returns one tagged stream: a tag byte (the codec, high bit =
shuffled) followed by the codec's output. The tag is one byte of the artifact and makes
`decompress` self-describing (and "best" possible). Level -1 is each codec's strongest setting:
zlib 9, lzma 9|EXTREME, brotli quality 11 (window 2^24, as the records), zstd 22, zpaq 5.
zpaq is ZPAQ context mixing (the back end of the `lrzip -z` the #1855 record runs on its per-group
streams) through the `zpaq` package's in-memory binding: levels 1..5, higher levels mean 5. It is
~2-4 s per MB at level 5 on one core, both ways, so "best" tries it only when asked (`BEST_CODECS`).
`threads` (quant.zpaq_threads) cuts a stream into that many blocks, compressed and decompressed in
parallel: the output is still deterministic; 2 blocks cost ~0.1% in size and halve the load time.
Byte shuffle (records #1530-#1851): bytes regrouped by position mod `stride`, prefixed `BSHF` +
stride byte, so the low and high bytes of fp16 scales (and the int8 planes) sit together.
"""
from __future__ import annotations

import lzma
import zlib

import brotli
import zstandard

from pgolf.errors import PgolfError

CODECS = ("zlib", "lzma", "brotli", "zstd", "zpaq")
BEST_CODECS = ("zlib", "lzma", "brotli", "zstd")  # what "best" tries: the fast codecs
_TAG = {"zlib": 0x01, "lzma": 0x02, "brotli": 0x03, "zstd": 0x04, "zpaq": 0x05}  # never 0x78: bare zlib
_CODEC = {v: k for k, v in _TAG.items()}
SHUFFLED = 0x80
SHUFFLE_MAGIC = b"BSHF"


def byte_shuffle(data: bytes, stride: int) -> bytes:
    if not 1 <= stride <= 255:
        raise ValueError(f"byte shuffle stride must be in 1..255, got {stride}")
    return SHUFFLE_MAGIC + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(blob: bytes) -> bytes:
    if blob[:4] != SHUFFLE_MAGIC or len(blob) < 5:
        raise PgolfError("corrupt artifact: byte-shuffle header missing")
    stride, body = blob[4], blob[5:]
    n = len(body)
    out = bytearray(n)
    pos = 0
    for i in range(stride):
        k = len(range(i, n, stride))
        out[i::stride] = body[pos:pos + k]
        pos += k
    return bytes(out)


ZPAQ_MISSING = "'zpaq' needs the `zpaq` package (pip install zpaq==0.3.7; it is in pgolf's dependencies)"


def zpaq_module():
    """The zpaq binding, or one PgolfError saying how to get it."""
    try:
        import zpaq
    except ImportError:
        raise PgolfError(f"codec {ZPAQ_MISSING}") from None
    return zpaq


def zpaq_level(level: int) -> int:
    return 5 if level < 0 else min(max(level, 1), 5)


def _raw_compress(data: bytes, codec: str, level: int, threads: int = 1) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, 9 if level < 0 else level)
    if codec == "lzma":
        preset = (9 | lzma.PRESET_EXTREME) if level < 0 else level
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=preset)
    if codec == "brotli":
        return brotli.compress(data, quality=11 if level < 0 else level, lgwin=24)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=22 if level < 0 else level).compress(data)
    if codec == "zpaq":
        return zpaq_module().compress(data, level=zpaq_level(level), threads=threads)
    raise PgolfError(f"unknown compressor {codec!r} (choose from {', '.join(CODECS)}, best, pergroup)")


def _raw_decompress(data: bytes, codec: str) -> bytes:
    if codec == "zlib":
        return zlib.decompress(data)
    if codec == "lzma":
        return lzma.decompress(data)
    if codec == "brotli":
        return brotli.decompress(data)
    if codec == "zpaq":
        return zpaq_module().decompress(data, threads=0)  # one worker per block
    return zstandard.ZstdDecompressor().decompress(data)


def compress(data: bytes, codec: str = "brotli", level: int = -1, shuffle: int = 0, threads: int = 1) -> bytes:
    """One tagged stream. codec "best" tries every codec of `BEST_CODECS` and keeps the smallest."""
    if codec == "best":
        return min((compress(data, c, level, shuffle) for c in BEST_CODECS), key=len)
    payload = byte_shuffle(data, shuffle) if shuffle > 1 else data
    tag = _TAG.get(codec)
    if tag is None:
        raise PgolfError(f"unknown compressor {codec!r} (choose from {', '.join(CODECS)}, best, pergroup)")
    return bytes([tag | (SHUFFLED if shuffle > 1 else 0)]) + _raw_compress(payload, codec, level, threads)


def decompress(blob: bytes) -> bytes:
    if not blob or (blob[0] & ~SHUFFLED) not in _CODEC:
        raise PgolfError("corrupt artifact: unknown compressor tag")
    codec = _CODEC[blob[0] & ~SHUFFLED]
    if codec == "zpaq":
        zpaq_module()  # a missing package is its own error, not a corrupt stream
    try:
        data = _raw_decompress(blob[1:], codec)
    except Exception as e:  # each codec raises its own error type
        raise PgolfError(f"corrupt artifact: {codec} stream does not decompress ({e})") from None
    return byte_unshuffle(data) if blob[0] & SHUFFLED else data


def codec_of(blob: bytes) -> str:
    return _CODEC.get(blob[0] & ~SHUFFLED, "?") if blob else "?"
