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

from dataclasses import dataclass
from typing import Callable

from pgolf.errors import PgolfError

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


# Each codec imports its library when used: code that reaches one codec does not need the others'.
def _zlib_c(data: bytes, level: int, threads: int) -> bytes:
    import zlib
    return zlib.compress(data, 9 if level < 0 else level)


def _zlib_d(data: bytes) -> bytes:
    import zlib
    return zlib.decompress(data)


def _lzma_c(data: bytes, level: int, threads: int) -> bytes:
    import lzma
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=(9 | lzma.PRESET_EXTREME) if level < 0 else level)


def _lzma_d(data: bytes) -> bytes:
    import lzma
    return lzma.decompress(data)


def _brotli_c(data: bytes, level: int, threads: int) -> bytes:
    import brotli
    return brotli.compress(data, quality=11 if level < 0 else level, lgwin=24)


def _brotli_d(data: bytes) -> bytes:
    import brotli
    return brotli.decompress(data)


def _zstd_c(data: bytes, level: int, threads: int) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=22 if level < 0 else level).compress(data)


def _zstd_d(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().decompress(data)


def _zpaq_c(data: bytes, level: int, threads: int) -> bytes:
    return zpaq_module().compress(data, level=zpaq_level(level), threads=threads)


def _zpaq_d(data: bytes) -> bytes:
    return zpaq_module().decompress(data, threads=0)  # one worker per block


@dataclass(frozen=True)
class Codec:
    tag: int  # the stream's first byte (never 0x78: a bare zlib stream is the baseline export)
    compress: Callable[[bytes, int, int], bytes]  # (data, level, threads)
    decompress: Callable[[bytes], bytes]


# The codec table. An exported record script keeps only the codecs its configuration names
# (`codecs_for`; pgolf.script.bundle trims this table).
CODECS = {"zlib": Codec(0x01, _zlib_c, _zlib_d), "lzma": Codec(0x02, _lzma_c, _lzma_d),
          "brotli": Codec(0x03, _brotli_c, _brotli_d), "zstd": Codec(0x04, _zstd_c, _zstd_d),
          "zpaq": Codec(0x05, _zpaq_c, _zpaq_d)}
BEST_CODECS = ("zlib", "lzma", "brotli", "zstd")  # what "best" tries: the fast codecs


def codecs_for(q) -> set[str]:
    """The codecs a QuantConfig can write or read: its compressor (every fast one for "best"), its
    group codec (validated whatever the compressor), and brotli for pergroup's rest stream."""
    named = set(BEST_CODECS) if q.compressor == "best" else {q.compressor}
    if q.compressor == "pergroup":
        named = {"brotli"}
    return {c for c in named | {q.group_codec} if c in CODECS}


def _codec(name: str) -> Codec:
    if name not in CODECS:
        raise PgolfError(f"unknown compressor {name!r} (choose from {', '.join(CODECS)}, best, pergroup)")
    return CODECS[name]


def _tag_codec(tag: int) -> str | None:
    return next((name for name, c in CODECS.items() if c.tag == tag), None)


def compress(data: bytes, codec: str = "brotli", level: int = -1, shuffle: int = 0, threads: int = 1) -> bytes:
    """One tagged stream. codec "best" tries every codec of `BEST_CODECS` and keeps the smallest."""
    if codec == "best":
        return min((compress(data, c, level, shuffle) for c in BEST_CODECS), key=len)
    c = _codec(codec)
    payload = byte_shuffle(data, shuffle) if shuffle > 1 else data
    return bytes([c.tag | (SHUFFLED if shuffle > 1 else 0)]) + c.compress(payload, level, threads)


def decompress(blob: bytes) -> bytes:
    codec = _tag_codec(blob[0] & ~SHUFFLED) if blob else None
    if codec is None:
        raise PgolfError("corrupt artifact: unknown compressor tag")
    if codec == "zpaq":
        zpaq_module()  # a missing package is its own error, not a corrupt stream
    try:
        data = CODECS[codec].decompress(blob[1:])
    except Exception as e:  # each codec raises its own error type
        raise PgolfError(f"corrupt artifact: {codec} stream does not decompress ({e})") from None
    return byte_unshuffle(data) if blob[0] & SHUFFLED else data


def codec_of(blob: bytes) -> str:
    return (_tag_codec(blob[0] & ~SHUFFLED) or "?") if blob else "?"
