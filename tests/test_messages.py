"""Messages name the real cause: a missing data directory (not the tokenizer inside it), an empty input file,
a command line argparse rejects."""
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


@pytest.mark.parametrize("argv, line", [
    (["stats"], "pgolf: error: stats: the following arguments are required: a_glob (see `pgolf stats --help`)"),
    (["data"], "pgolf: error: data: the following arguments are required: data_command (see `pgolf data --help`)"),
    (["train", "--preset"], "pgolf: error: train: argument --preset: expected one argument (see `pgolf train --help`)"),
    (["registry"], "pgolf: error: argument command: invalid choice: 'registry' (choose from 'params', 'data', "
                   "'train', 'quantize', 'eval', 'bench', 'plan', 'sweep', 'stats', 'export', 'check') "
                   "(see `pgolf --help`)"),
], ids=["missing-argument", "missing-subcommand", "missing-value", "unknown-command"])
def test_a_command_line_argparse_rejects_is_one_error_line(argv, line, cli):
    """The contract's form for usage errors too: one `pgolf: error:` line naming the subcommand, exit 2,
    no usage block (argparse's own error prints the usage and exits from inside the parser)."""
    rc, res, err = cli(*argv)
    assert rc == 2 and res is None and err.strip().splitlines() == [line]


def test_the_record_pipeline_rejects_a_bad_flag_in_one_line(capsys):
    from pgolf.export import record

    assert record.cli(["--bogus"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "pgolf: error: unrecognized arguments: --bogus (see `python -m pgolf.export.record --help`)"]


def test_every_command_has_a_row_in_the_cli_contract():
    """docs/cli-contract.md is what callers rely on: each subcommand the parser knows (and each of
    `data`'s) has a row there, and the rows name no command the parser lacks."""
    import argparse
    import re
    from pathlib import Path

    from pgolf.cli import build_parser

    def commands(parser: argparse.ArgumentParser, prefix: str) -> set[str]:
        out = set()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = commands(sub, f"{prefix} {name}")
                    out |= nested or {f"{prefix} {name}"}
        return out

    known = commands(build_parser(), "pgolf")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli-contract.md").read_text()
    rows = {" ".join(m.group(1).split()[:3 if m.group(1).startswith("pgolf data") else 2])
            for m in re.finditer(r"^\| `(pgolf [a-z]+(?: [a-z]+)?)", doc, re.M)}
    assert rows == known, (known - rows, rows - known)

