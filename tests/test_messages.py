"""Messages name the real cause: a missing data directory (not the tokenizer inside it), an empty input file."""
import pytest

SHARED_TOKENIZER = "fineweb_1024_bpe.model"


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "cpu-smoke", "--data", "{missing}"],
    ["train", "--preset", "cpu-smoke", "--data", "{missing}", "--tokenizer", "{tokenizer}"],
    ["data", "audit", "--data", "{missing}"],
], ids=["train", "train-with-tokenizer", "audit"])
def test_a_missing_data_directory_is_named(argv, tmp_path, shared_dir, cli):
    missing = tmp_path / "no-such-data"
    fill = {"missing": missing, "tokenizer": shared_dir / "tokenizers" / SHARED_TOKENIZER}
    rc, res, err = cli(*[a.format(**fill) for a in argv], *(["--out", tmp_path / "r"] if argv[0] == "train" else []))
    assert rc == 2 and res is None
    assert err.strip().splitlines() == [f"pgolf: error: {missing}: data directory not found (make one with "
                                        "`pgolf data build` or `pgolf data fetch`)"]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.txt", "\n  \n\n"), ("blank.jsonl", "\n\n")])
def test_an_empty_build_input_is_named(name, text, tmp_path, shared_dir, cli):
    empty = tmp_path / name
    empty.write_text(text)
    good = shared_dir / "data" / "docs_selected_sample200.jsonl"
    rc, res, err = cli("data", "build", "--input", good, empty, "--tokenizer",
                       shared_dir / "tokenizers" / SHARED_TOKENIZER, "--val-docs", "10", "--out", tmp_path / "out")
    assert rc == 2 and res is None
    assert err.strip().splitlines() == [f"pgolf: error: {empty}: empty input file (no documents)"]
    assert not (tmp_path / "out").exists()
