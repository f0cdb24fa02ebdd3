"""A clone of pgolf stands alone (issue 18): the committed data fixture matches the checksums its
README records and scripts/make_fixtures.py rebuilds it; the dependency files tell one story; and
a copy of the repository with nothing beside it collects the suite and builds its data."""
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ROW = re.compile(r"^\| `(?P<file>[^`]+)` \| `(?P<sha>[0-9a-f]{64})` \| (?P<size>[0-9,]+) \|$", re.M)


def _contents(path: Path) -> bytes:
    """A fixture file as the tests read it (the .jsonl.gz files uncompressed)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixture_files_match_the_recorded_checksums():
    rows = {m["file"]: m["sha"] for m in ROW.finditer((FIXTURES / "README.md").read_text())}
    files = {str(f.relative_to(FIXTURES)) for f in FIXTURES.rglob("*") if f.is_file() and f.name != "README.md"}
    assert files == set(rows) and len(rows) == 5
    for rel, sha in rows.items():
        assert hashlib.sha256(_contents(FIXTURES / rel)).hexdigest() == sha, rel
    assert sum((FIXTURES / rel).stat().st_size for rel in rows) < 3_000_000


def test_make_fixtures_rebuilds_the_fixture_from_a_reference_folder(tmp_path, capsys):
    mf = _make_fixtures()
    src = tmp_path / "shared"  # laid out like the project's reference folder
    for rel in [f"data/{name}" for name, _ in mf.DOCS] + [f"tokenizers/{t}" for t in mf.TOKENIZERS]:
        stored = FIXTURES / (rel + ".gz" if rel.startswith("data/") else rel)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(_contents(stored))
    assert mf.main(["--source", str(src), "--out", str(tmp_path / "out")]) == 0
    printed = {m["file"]: m["sha"] for m in ROW.finditer(capsys.readouterr().out)}
    recorded = {m["file"]: m["sha"] for m in ROW.finditer((FIXTURES / "README.md").read_text())}
    assert printed == recorded
    for rel in recorded:
        assert _contents(tmp_path / "out" / rel) == _contents(FIXTURES / rel), rel
    (src / "data" / "fineweb_sample10bt_1000.jsonl").unlink()
    with pytest.raises(SystemExit, match="fineweb_sample10bt_1000.jsonl not found"):
        mf.main(["--source", str(src), "--out", str(tmp_path / "again")])


def test_make_fixtures_from_the_hub_takes_tokenizers_and_the_head_of_docs_selected(tmp_path, monkeypatch):
    mf = _make_fixtures()
    asked = []

    def download(repo_id, filename):
        asked.append((repo_id, filename))
        return (FIXTURES / "tokenizers" / Path(filename).name).read_bytes()

    def lines(path, n):
        assert path.endswith("willdepueoai/parameter-golf/datasets/docs_selected.jsonl")
        return [json.dumps({"text": f"document {i}", "id": i, "url": "x"}).encode() + b"\n" for i in range(n)]

    monkeypatch.setattr(mf, "_hub_download", download)
    monkeypatch.setattr(mf, "_hub_lines", lines)
    assert mf.main(["--hub", "--out", str(tmp_path)]) == 0
    assert sorted(asked) == [("kevclark/parameter-golf", "datasets/tokenizers/fineweb_8192_bpe.model"),
                             ("willdepueoai/parameter-golf", "datasets/tokenizers/fineweb_1024_bpe.model")]
    first = 0
    for name, n in mf.DOCS:  # validation first, then the two training files, back to back
        docs = [json.loads(x) for x in _contents(tmp_path / "data" / f"{name}.gz").decode().splitlines()]
        assert docs == [{"text": f"document {i}"} for i in range(first, first + n)]
        first += n
    assert _contents(tmp_path / "tokenizers" / "fineweb_8192_bpe.model") == \
        (FIXTURES / "tokenizers" / "fineweb_8192_bpe.model").read_bytes()


def test_one_dependency_story():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]  # make installs every extra from the lock (dev, lab, browser)
    wanted = [Requirement(r) for r in project["dependencies"] + [r for reqs in extras.values() for r in reqs]]
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements-cpu.lock").read_text(), re.M))
    lock = {canonicalize_name(k): v for k, v in lock.items()}
    for req in wanted:  # a dependency added to pyproject without `make lock` fails here
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in requirements-cpu.lock: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock has {name}=={lock[name]}, wants {req}"
    torch = next(str(r.specifier) for r in wanted if r.name == "torch")
    env = re.search(r"^\s*-\s*torch(?P<spec>[<>=!~][^\s#]*)", (ROOT / "environment.yml").read_text(), re.M)
    assert env and SpecifierSet(env["spec"]) == SpecifierSet(torch)
    make = re.search(r"^TORCH_CPU\s*\?=\s*torch==(?P<v>\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make and lock["torch"] == make["v"] and make["v"].endswith("+cpu")  # the CPU build, no CUDA wheels
    assert not any(name.startswith("nvidia-") for name in lock)


def _copy_of_the_repository(dest: Path) -> Path:
    """The files a clone would hold (tracked and not ignored), copied to `dest` with nothing beside it."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.mark.slow
def test_a_copy_with_nothing_beside_it_collects_the_suite_and_builds_its_data(tmp_path):
    repo = _copy_of_the_repository(tmp_path / "alone" / "pgolf")
    assert sorted(p.name for p in repo.parent.iterdir()) == ["pgolf"]  # no shared/ (or anything) beside it
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the copy's pgolf, not the installed one

    def pytest_in_copy(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)

    collected = pytest_in_copy("--collect-only", "-q")
    assert collected.returncode == 0 and " collected" in collected.stdout, collected.stdout[-3000:]
    assert "ERROR" not in collected.stdout, collected.stdout[-3000:]
    # the session fixtures really build the FineWeb data folders from the copy's tests/fixtures
    built = pytest_in_copy("-q", "tests/test_data_build.py::test_build_with_official_tokenizer")
    assert built.returncode == 0 and "2 passed" in built.stdout, built.stdout[-3000:] + built.stderr[-2000:]
