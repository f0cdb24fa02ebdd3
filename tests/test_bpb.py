"""Tokenizer-true bytes: the LUT rules on hand-picked pieces, the audit (LUT bytes == decoded UTF-8
bytes) on shards built from the shared FineWeb samples with each official tokenizer, load_val,
CaseOps sidecars, and vocabulary mismatches."""
import math
import shutil

import numpy as np
import pytest
import torch

from pgolf.distributed import teardown
from pgolf.data import shards
from pgolf.data.build import read_documents
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import PgolfError
from pgolf.data import bytes as data_bytes
from pgolf.eval import bpb


@pytest.fixture(scope="module")
def sp1024(shared_dir):
    return load_tokenizer(shared_dir / "tokenizers" / "fineweb_1024_bpe.model")


def test_lut_rules_on_hand_picked_pieces(sp1024):
    luts = data_bytes.build_luts(sp1024, 1024)
    the, t, byte_c3 = sp1024.piece_to_id("\u2581the"), sp1024.piece_to_id("in"), sp1024.piece_to_id("<0xC3>")
    assert sp1024.is_byte(byte_c3)
    assert luts.base_bytes[byte_c3] == 1 and not luts.is_boundary[byte_c3]  # byte fallback = 1 byte
    assert luts.base_bytes[the] == 3 and luts.has_leading_space[the]  # "▁the" = "the" + a space
    assert luts.base_bytes[t] == 2 and not luts.has_leading_space[t]
    for special in (0, 1, 2, 3):  # pad, BOS, EOS, UNK
        assert luts.is_boundary[special] and luts.base_bytes[special] == 0
    prev = torch.tensor([5 + 260, 1, 1, t, byte_c3, t])
    tgt = torch.tensor([the, the, t, 1, the, byte_c3])
    # "▁the" after a piece: 4; after BOS: 3 (its space is not counted); "in" after BOS: 2;
    # BOS as a target: 0; "▁the" after a byte piece: 4; a byte piece: 1
    assert data_bytes.target_bytes(prev, tgt, luts).tolist() == [4, 3, 2, 0, 4, 1]
    # numpy uint16 inputs (straight from shards) give the same
    assert data_bytes.target_bytes(prev.numpy().astype(np.uint16), tgt.numpy().astype(np.uint16), luts).tolist() == \
        [4, 3, 2, 0, 4, 1]


def test_lut_padding_and_too_small_vocab(sp1024):
    luts = data_bytes.build_luts(sp1024, 1030)  # ids past the tokenizer are boundaries with 0 bytes
    assert luts.is_boundary[1024:].all() and not luts.base_bytes[1024:].any()
    with pytest.raises(PgolfError, match="vocabulary mismatch"):
        data_bytes.build_luts(sp1024, 1000)


@pytest.mark.parametrize("fixture", ["sp1024_data", "sp8192_data"])
def test_audit_lut_bytes_equal_decoded_bytes(request, cli, shared_dir, fixture):
    data = request.getfixturevalue(fixture)
    rc, res, err = cli("data", "audit", "--data", data)
    assert rc == 0, err
    assert res["match"] is True and res["lut_bytes"] == res["decoded_bytes"] > 0
    assert res["val_tokens"] == shards.load_split(data, "val").size and res["val_docs"] == 200
    # independent of the shards: what the tokenizer makes of the raw documents
    sp = load_tokenizer(data / "tokenizer.model")
    docs = read_documents(shared_dir / "data" / "docs_selected_sample200.jsonl")
    assert res["decoded_bytes"] == sum(len(t.encode()) for t in sp.decode(sp.encode(docs)))
    raw = sum(len(d.encode()) for d in docs)
    assert 0.97 * raw < res["lut_bytes"] <= raw  # NFKC and whitespace folding only shrink the text


def test_load_val_truncation_bytes_and_cap(sp1024_data):
    val = shards.load_split(sp1024_data, "val").astype(np.int64)
    v = bpb.load_val(sp1024_data, None, 1024, seq_len=1024)
    n = (val.size - 1) // 1024 * 1024
    assert v.tokens.dtype == torch.int64 and v.tokens.tolist() == val[: n + 1].tolist()
    assert v.bytes.dtype == torch.int16 and v.bytes.numel() == n and v.byte_source == "lut"
    luts = data_bytes.build_luts(load_tokenizer(sp1024_data / "tokenizer.model"), 1024)
    assert torch.equal(v.bytes, data_bytes.target_bytes(v.tokens[:-1], v.tokens[1:], luts))
    assert v.doc_starts.tolist() == np.flatnonzero(val[: n + 1] == 1).tolist()
    capped = bpb.load_val(sp1024_data, sp1024_data / "tokenizer.model", 1024, seq_len=1024, max_tokens=5000)
    assert capped.num_targets == 4096 and torch.equal(capped.bytes, v.bytes[:4096])
    with pytest.raises(PgolfError, match="shorter than one sequence"):
        bpb.load_val(sp1024_data, None, 1024, seq_len=10 ** 7)


def test_caseops_sidecar_replaces_luts(sp1024_data, tmp_path):
    for f in shards.list_shards(sp1024_data, "val") + [sp1024_data / "tokenizer.model"]:
        shutil.copy(f, tmp_path / f.name)
    val = shards.load_split(tmp_path, "val")
    side = (np.arange(val.size) % 5).astype(np.uint16)
    half = val.size // 2
    shards.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", side[:half])
    shards.write_shard(tmp_path / "fineweb_val_bytes_000001.bin", side[half:])
    v = bpb.load_val(tmp_path, None, 1024, seq_len=512)
    assert v.byte_source == "sidecar" and v.bytes.tolist() == side[1: v.num_targets + 1].tolist()
    assert v.tokens.numel() == (val.size - 1) // 512 * 512 + 1  # the sidecar never enters the tokens
    shards.write_shard(tmp_path / "fineweb_val_bytes_000001.bin", side[half:-1])
    with pytest.raises(PgolfError, match="parallel"):
        bpb.load_val(tmp_path, None, 1024, seq_len=512)


def test_vocab_mismatch_and_missing_tokenizer(cli, shared_dir, sp1024_data, sp8192_data, tmp_path):
    sp8192 = shared_dir / "tokenizers" / "fineweb_8192_bpe.model"
    sp1024 = shared_dir / "tokenizers" / "fineweb_1024_bpe.model"
    with pytest.raises(PgolfError, match="vocabulary mismatch"):
        bpb.load_val(sp1024_data, None, 8192, seq_len=1024)
    for data, tok in [(sp1024_data, sp8192), (sp8192_data, sp1024)]:
        rc, _, err = cli("data", "audit", "--data", data, "--tokenizer", tok)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "vocabulary mismatch" in err, err
    # without a manifest the shard ids still give the mismatch away
    for f in shards.list_shards(sp8192_data, "val"):
        shutil.copy(f, tmp_path / f.name)
    rc, _, err = cli("data", "audit", "--data", tmp_path, "--tokenizer", sp1024)
    assert rc == 2 and "vocabulary mismatch" in err and "fineweb_val_000000.bin" in err, err
    rc, _, err = cli("data", "audit", "--data", tmp_path)
    assert rc == 2 and err.strip() == f"pgolf: error: {tmp_path / 'tokenizer.model'}: tokenizer not found"


def test_bpb_from_sums_and_allreduce(tmp_path):
    loss, bpb_ = bpb.bpb_from_sums(torch.tensor(693.1471805599453, dtype=torch.float64), 1000, 500)
    assert loss == pytest.approx(0.6931471805599453) and bpb_ == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bpb.bpb_from_sums(1.0, 0, 10)
    assert bpb.allreduce_sums(1.5, torch.tensor(2), 3) == (1.5, 2.0, 3.0)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        big = 2.0 ** 53 + 2  # float64 keeps what float32 would round
        assert bpb.allreduce_sums(big, 7) == (big, 7.0)
    finally:
        teardown()  # destroys the group, then collects (see its docstring)
    assert math.isclose(bpb.bpb_from_sums(*bpb.allreduce_sums(10.0, 4, 5)[:1], 4, 5)[1], 10 / (5 * math.log(2)))
