"""Shared fixtures: the committed sample in tests/fixtures (see its README.md) and data folders built
from it once per session. Nothing outside the repository is read.

`sp1024_data` / `sp8192_data`: validation = docs_selected_sample200.jsonl (200 documents, first),
training = fineweb_default_sample300.jsonl + fineweb_sample10bt_1000.jsonl, encoded with the
official tokenizer, in 500k-token shards (so several train shards and two val shards exist).
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

# One intra-op thread per process: tests start subprocesses (torchrun ranks, papermill kernels) beside
# the pytest process, and on a 2-core machine OpenMP spin-waits of oversubscribed threads made small
# ops 10-70x slower. Subprocesses inherit the setting through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VAL_FILE = "docs_selected_sample200.jsonl"
TRAIN_FILES = ("fineweb_default_sample300.jsonl", "fineweb_sample10bt_1000.jsonl")
SHARD_TOKENS = 500_000


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """tests/fixtures unpacked: data/<name>.jsonl (committed gzipped) and tokenizers/<model>."""
    out = tmp_path_factory.mktemp("fixtures")
    (out / "data").mkdir()
    for gz in sorted((FIXTURES / "data").glob("*.jsonl.gz")):
        (out / "data" / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    shutil.copytree(FIXTURES / "tokenizers", out / "tokenizers")
    return out


@pytest.fixture(scope="session")
def shared_dir(fixtures_dir) -> Path:
    """The former name of `fixtures_dir` (it once pointed outside the repository), kept for the tests that use it."""
    return fixtures_dir


def _build(fixtures: Path, out: Path, model: str) -> Path:
    from pgolf.data.build import build_from_files

    data = fixtures / "data"
    build_from_files([data / VAL_FILE] + [data / f for f in TRAIN_FILES], out, val_docs=200,
                     tokenizer=fixtures / "tokenizers" / model, shard_tokens=SHARD_TOKENS)
    return out


@pytest.fixture(scope="session")
def sp1024_data(fixtures_dir, tmp_path_factory) -> Path:
    return _build(fixtures_dir, tmp_path_factory.mktemp("sp1024"), "fineweb_1024_bpe.model")


@pytest.fixture(scope="session")
def sp8192_data(fixtures_dir, tmp_path_factory) -> Path:
    return _build(fixtures_dir, tmp_path_factory.mktemp("sp8192"), "fineweb_8192_bpe.model")


@pytest.fixture
def cli(capsys):
    """Run `pgolf ARGS...` in-process: returns (exit status, final JSON line or None, stderr text)."""
    import json

    from pgolf.cli import main

    def run(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        return rc, (json.loads(lines[-1]) if rc == 0 and lines else None), err

    return run
