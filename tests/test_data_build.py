"""Building data folders: official tokenizers on the shared FineWeb samples, a trained tokenizer on
the embedded corpus, and the CLI's one-line errors."""
import json

import numpy as np
import pytest

from pgolf.data import shards
from pgolf.data.build import read_documents
from pgolf.fileio import sha256_file
from pgolf.data.tokenizer import load_tokenizer

OFFICIAL_SHA = {  # tests/fixtures/README.md
    "fineweb_1024_bpe.model": "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a",
    "fineweb_8192_bpe.model": "0518df93315eaff6bc75ad4d9711b01c1b5e9ac32e8b3da603c040d8653f7f03",
}


@pytest.mark.parametrize("fixture, model, vocab", [("sp1024_data", "fineweb_1024_bpe.model", 1024),
                                                   ("sp8192_data", "fineweb_8192_bpe.model", 8192)])
def test_build_with_official_tokenizer(request, shared_dir, fixture, model, vocab):
    out = request.getfixturevalue(fixture)
    m = json.loads((out / "manifest.json").read_text())
    assert m["vocab_size"] == vocab and m["documents"] == {"val": 200, "train": 1300}
    assert m["tokenizer"]["sha256"] == sha256_file(out / "tokenizer.model") == OFFICIAL_SHA[model]
    for split in ("val", "train"):
        files = shards.list_shards(out, split)
        counts = [shards.read_header(f) for f in files]
        assert sum(counts) == m["tokens"][split]
        assert all(c == 500_000 for c in counts[:-1]) and 0 < counts[-1] <= 500_000
        for f in files:
            assert m["shards"][f.name]["sha256"] == sha256_file(f)
    assert len(shards.list_shards(out, "train")) >= 2
    # every document is [BOS] + encode(text), no EOS, back to back; the 200 val docs come first
    val = shards.load_split(out, "val", vocab).astype(np.int64)
    assert (val == 1).sum() == 200 and val[0] == 1 and not (val == 2).any()
    sp = load_tokenizer(out / "tokenizer.model")
    docs = read_documents(shared_dir / "data" / "docs_selected_sample200.jsonl")
    first, second = ([1] + sp.encode(d) for d in docs[:2])
    assert val[: len(first) + len(second)].tolist() == first + second
    train = shards.load_split(out, "train")
    other = read_documents(shared_dir / "data" / "fineweb_default_sample300.jsonl")[0]
    assert train[: 1 + len(sp.encode(other))].tolist() == [1] + sp.encode(other)


def test_sample_build_trains_a_tokenizer(cli, tmp_path):
    rc, res, err = cli("data", "build", "--sample", "--vocab-size", "512", "--out", tmp_path / "s")
    assert rc == 0, err
    assert set(res) >= {"out", "tokenizer", "train_tokens", "val_tokens", "val_docs"}
    assert res["val_docs"] == 7 and res["train_tokens"] > 10 * res["val_tokens"] > 0
    sp = load_tokenizer(res["tokenizer"])
    assert sp.vocab_size() == 512 and sp.bos_id() == 1 and sp.pad_id() == 0 and sp.unk_id() == 3
    assert sp.id_to_piece(4) == "<0x00>"  # byte fallback
    assert sp.encode("12345") == [sp.piece_to_id(c) for c in "12345"]  # split_digits
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["tokenizer"]["trained"] and m["sources"][0]["path"] == "pydoc_data.topics"
    assert shards.load_split(tmp_path / "s", "train").max() < 512
    # a rebuild with fewer tokens per shard replaces the old shards instead of mixing with them
    rc, res2, err = cli("data", "build", "--sample", "--tokenizer", res["tokenizer"], "--shard-tokens", "50000",
                        "--out", tmp_path / "s")
    assert rc == 0, err
    assert res2["train_tokens"] == res["train_tokens"]
    assert len(shards.list_shards(tmp_path / "s", "train")) == -(-res["train_tokens"] // 50000)


def test_txt_input_splits_on_blank_lines(cli, shared_dir, tmp_path):
    src = tmp_path / "docs.txt"
    src.write_text("first document\nstill first\n\n  \nsecond one\n\n\nthird, 123\n")
    assert read_documents(src) == ["first document\nstill first", "second one", "third, 123"]
    rc, res, err = cli("data", "build", "--input", src, "--val-docs", "1", "--out", tmp_path / "o",
                       "--tokenizer", shared_dir / "tokenizers" / "fineweb_1024_bpe.model")
    assert rc == 0, err
    assert res["val_docs"] == 1 and (shards.load_split(tmp_path / "o", "train") == 1).sum() == 2


def _one_error_line(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgolf: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_errors(cli, shared_dir, tmp_path):
    docs = shared_dir / "data" / "docs_selected_sample200.jsonl"
    sp1024 = shared_dir / "tokenizers" / "fineweb_1024_bpe.model"
    _one_error_line(*cli("data", "build", "--input", docs, "--val-docs", "10", "--tokenizer",
                         tmp_path / "missing.model", "--out", tmp_path / "o")[::2], "missing.model", "not found")
    _one_error_line(*cli("data", "build", "--input", docs, "--val-docs", "10", "--tokenizer", sp1024,
                         "--vocab-size", "8192", "--out", tmp_path / "o")[::2], "vocabulary mismatch")
    _one_error_line(*cli("data", "build", "--input", docs, "--tokenizer", sp1024, "--out", tmp_path / "o")[::2],
                    "--val-docs")
    _one_error_line(*cli("data", "build", "--input", docs, "--val-docs", "200", "--tokenizer", sp1024,
                         "--out", tmp_path / "o")[::2], "--val-docs 200")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    _one_error_line(*cli("data", "build", "--input", bad, "--val-docs", "1", "--tokenizer", sp1024,
                         "--out", tmp_path / "o")[::2], "bad.jsonl:2")
    notmodel = tmp_path / "junk.model"
    notmodel.write_bytes(b"not a model")
    _one_error_line(*cli("data", "build", "--sample", "--tokenizer", notmodel, "--out", tmp_path / "o")[::2],
                    "junk.model", "SentencePiece")
    assert not (tmp_path / "o").exists()  # nothing was written for bad input
