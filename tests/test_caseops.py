"""CaseOps (docs/records/record-stack.md §5.9, §1.4): the transform, its inverse, original-byte sidecars, and
`pgolf data build --caseops` on the shared FineWeb samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pgolf.data import caseops as C
from pgolf.data import shards
from pgolf.errors import PgolfError

T, A, N, E = C.TITLE, C.ALLCAPS, C.CAPNEXT, C.ESC


@pytest.mark.parametrize("text,want", [
    ("the cat", "the cat"),
    ("The Cat", f"{T}the {T}cat"),
    ("THE CAT", f"{A}the {A}cat"),
    ("A cat", f"{T}a cat"),  # a lone capital: TITLE (ALLCAPS needs two letters)
    ("iPhone", f"i{N}phone"),
    ("McDonald", f"{T}mc{N}donald"),
    ("NASA's A/B tests", f"{A}nasa's {T}a/{T}b tests"),
    ("caf\u00e9 \u00c9t\u00e9", "caf\u00e9 \u00c9t\u00e9"),  # only ASCII letters are touched
    (f"x{T}y", f"x{E}{T}y"),  # an operator in the text is escaped
])
def test_encode_examples(text, want):
    assert C.encode(text) == want
    assert C.decode(want) == text


TEXT = st.text(alphabet=st.sampled_from(list("abcXYZ Q.'\n\u00e9\u6771") + list(C.OPERATORS)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_round_trip_and_bytes_of_any_piece_split(text, cuts):
    enc = C.encode(text)
    assert C.decode(enc) == text
    bounds = sorted({min(c, len(enc)) for c in cuts} | {0, len(enc)})
    pieces = [enc[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    counts = C.original_bytes(pieces)
    assert sum(counts) == len(text.encode("utf-8"))


def test_original_bytes_per_piece():
    assert C.original_bytes([T, "the", " é"]) == [0, 3, 3]  # the operator 0, letters 1, é 2
    assert C.original_bytes([E, T, A + "nasa"]) == [0, 3, 4]  # an escaped operator is 3 bytes of text


PIECE = st.text(alphabet=st.sampled_from(list("ab \u00e9\u6771") + list(C.OPERATORS)), max_size=4)


@settings(max_examples=200, deadline=None)
@given(vocab=st.lists(PIECE, min_size=1, max_size=12), picks=st.lists(st.integers(min_value=0), max_size=80))
def test_token_bytes_by_table_equals_the_piece_walk(vocab, picks):
    """The audit's vectorised count agrees with `original_bytes` on any vocabulary, ESC chains across
    pieces (and pieces that hold several operators) included."""
    ids = np.array([p % len(vocab) for p in picks], dtype=np.int64)
    assert C.token_bytes(ids, vocab).tolist() == C.original_bytes([vocab[i] for i in ids])


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aZ \u00e9\U0001f600") + list(C.OPERATORS)), max_size=40))
def test_original_length_equals_the_walk(text):
    assert C.original_length(text) == sum(C.original_bytes([text]))


def test_token_bytes_escape_state_crosses_pieces():
    vocab = ["<s>", E, T, "ab", ""]
    ids = np.array([1, 2, 2, 1, 1, 1, 4, 2, 1, 0, 2, 3])
    assert C.token_bytes(ids, vocab).tolist() == [0, 3, 0, 0, 3, 0, 0, 3, 0, 3, 0, 2]  # "" keeps the escape
    assert C.token_bytes(ids, vocab, boundary=0).tolist() == [0, 3, 0, 0, 3, 0, 0, 3, 0, 0, 0, 2]  # BOS ends it


@pytest.mark.parametrize("bad", [f"{T}", f"a{T}b", f"{T}{A}x", f"{N}{N}x", f"{T} x", f"x{E}"])
def test_decode_rejects_what_encode_cannot_produce(bad):
    with pytest.raises(PgolfError, match="CaseOps"):
        C.decode(bad)


@pytest.fixture(scope="module")
def caseops_data(shared_dir, tmp_path_factory):
    from pgolf.data.build import build_from_files

    d = shared_dir / "data"
    out = tmp_path_factory.mktemp("caseops")
    res = build_from_files([d / "docs_selected_sample200.jsonl", d / "fineweb_default_sample300.jsonl"], out,
                           val_docs=200, vocab_size=1024, caseops=True)
    return out, res


def test_build_caseops_reserves_operators_and_sidecars_count_original_bytes(caseops_data, shared_dir):
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.data.bytes import audit
    from pgolf.eval.bpb import load_val

    out, res = caseops_data
    assert res["text_transform"] == C.NAME
    assert json.loads((out / "manifest.json").read_text())["text_transform"] == C.NAME
    sp = load_tokenizer(out / "tokenizer.model")
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(C.OPERATORS) and sp.id_to_piece(8) == "<0x00>"
    val, side = shards.load_split(out, "val"), shards.load_split(out, "val_bytes")
    assert side.shape == val.shape and np.all(side[val == 1] == 0)  # parallel; BOS carries no bytes
    assert np.isin(np.arange(4, 7), val).all()  # TITLE, ALLCAPS, CAPNEXT are really used (ESC: no PUA text)
    raw = [json.loads(line)["text"] for line in open(shared_dir / "data" / "docs_selected_sample200.jsonl")]
    cuts = np.append(np.flatnonzero(val == 1), val.size)
    per_doc = [int(side[a:b].sum()) for a, b in zip(cuts[:-1], cuts[1:])]
    assert per_doc == [len(t.encode("utf-8")) for t in raw]  # exactly the original text's bytes
    v = load_val(out, None, 1024, 256)
    assert v.byte_source == "sidecar"
    a = audit(out)
    assert a["match"] and a["text_transform"] == C.NAME
    assert a["lut_bytes"] > 1.05 * a["sidecar_bytes"]  # LUTs on CaseOps pieces overcount (#2071 pitfall)


def test_caseops_data_trains_and_scores_with_the_sidecar(caseops_data, tmp_path, cli):
    out, _ = caseops_data
    tiny = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
            "train.train_seq_len=64", "train.eval_seq_len=64", "train.train_batch_tokens=512",
            "data.val_max_tokens=4096", "train.iterations=2", "train.max_seconds=0"]
    rc, res, err = cli("train", "--preset", "cpu-smoke", "--data", out, "--out", tmp_path / "run",
                       *[a for s in tiny for a in ("--set", s)])
    assert rc == 0, err
    assert 0 < res["val_bpb"] < 20


def test_non_caseops_tokenizer_is_refused(shared_dir, tmp_path, cli):
    d = shared_dir / "data"
    rc, res, err = cli("data", "build", "--input", d / "docs_selected_sample200.jsonl", "--val-docs", "100",
                       "--tokenizer", shared_dir / "tokenizers" / "fineweb_1024_bpe.model", "--caseops",
                       "--out", tmp_path / "out")
    assert rc == 2 and err.count("pgolf: error:") == 1 and "not a CaseOps tokenizer" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_caseops_audit_tells_whitespace_runs_from_a_misaligned_sidecar(tmp_path):
    """The embedded sample has runs of whitespace that the tokenizer's normaliser collapses: the decoded
    text is some percents shorter than the sidecar's original bytes, and the audit still matches, token by
    token (each run sits in the surface of a piece that opens with a space). A sidecar shifted by one
    token no longer matches."""
    from pgolf.data.build import build_sample
    from pgolf.data.bytes import audit

    out = tmp_path / "d"
    build_sample(out, vocab_size=1024, caseops=True)
    a = audit(out)
    assert a["match"] and a["mismatched_tokens"] <= 1e-3 * a["val_tokens"]
    assert a["normalisation_delta_bytes"] > 0.01 * a["decoded_bytes"]  # the runs: > 1% of the text
    assert abs(a["whitespace_run_bytes"] - a["normalisation_delta_bytes"]) <= 1e-3 * a["decoded_bytes"]
    (path,) = shards.list_shards(out, "val_bytes")
    side = shards.read_shard(path)
    shards.write_shard(path, np.roll(side, 1))
    b = audit(out)
    assert not b["match"] and b["mismatched_tokens"] > 0.1 * b["val_tokens"]
