"""Shard format: round trip, listing, and every way a shard can be broken."""
import numpy as np
import pytest

from pgolf.data import shards
from pgolf.errors import PgolfError


def test_round_trip_and_header(tmp_path):
    toks = np.array([1, 0, 65535, 42, 7], dtype=np.int64)
    p = shards.write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    raw = p.read_bytes()
    assert len(raw) == 1024 + 2 * toks.size
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    got = shards.read_shard(p)
    assert isinstance(got, np.memmap) and got.dtype == np.dtype("<u2")
    assert got.tolist() == toks.tolist()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_empty_shard(tmp_path):
    p = shards.write_shard(tmp_path / "fineweb_val_000000.bin", [])
    assert shards.read_shard(p).size == 0


def test_write_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(PgolfError, match="uint16"):
        shards.write_shard(tmp_path / "x.bin", [1, 70000])
    assert not (tmp_path / "x.bin").exists()


def _corrupt(tmp_path, fn):
    p = shards.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(10))
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(fn(data)))
    return p


@pytest.mark.parametrize("fn, message", [
    (lambda d: d[:500], "truncated"),
    (lambda d: d[:0], "truncated"),
    (lambda d: d[:-2], "does not match"),
    (lambda d: d + b"\0\0", "does not match"),
    (lambda d: d.__setitem__(slice(0, 4), (123).to_bytes(4, "little")) or d, "bad magic"),
    (lambda d: d.__setitem__(slice(4, 8), (2).to_bytes(4, "little")) or d, "version 2"),
])
def test_corruption_is_named(tmp_path, fn, message):
    p = _corrupt(tmp_path, fn)
    with pytest.raises(PgolfError, match=message) as e:
        shards.read_shard(p)
    assert str(p) in str(e.value)


def test_vocab_check_and_missing(tmp_path):
    p = shards.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 1023, 1024])
    assert shards.read_shard(p, vocab_size=1025).size == 4
    with pytest.raises(PgolfError, match="1024 >= vocab_size 1024"):
        shards.read_shard(p, vocab_size=1024)
    with pytest.raises(PgolfError, match="not found"):
        shards.read_shard(tmp_path / "nope.bin")


def test_listing_skips_byte_sidecars_and_concatenates(tmp_path):
    for name, toks in [("fineweb_val_000001.bin", [3, 4]), ("fineweb_val_000000.bin", [1, 2]),
                       ("fineweb_val_bytes_000000.bin", [0, 9, 9, 9]), ("fineweb_train_000000.bin", [7])]:
        shards.write_shard(tmp_path / name, toks)
    assert [p.name for p in shards.list_shards(tmp_path, "val")] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in shards.list_shards(tmp_path, "val_bytes")] == ["fineweb_val_bytes_000000.bin"]
    assert shards.load_split(tmp_path, "val").tolist() == [1, 2, 3, 4]
    assert shards.load_split(tmp_path, "train").tolist() == [7]
    with pytest.raises(PgolfError, match="no fineweb_val_"):
        shards.load_split(tmp_path / "empty", "val")
    with pytest.raises(PgolfError, match="split"):
        shards.list_shards(tmp_path, "test")
