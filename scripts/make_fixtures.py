"""Rebuild the committed test fixture, tests/fixtures/ (see its README.md for what it holds and why).

    python scripts/make_fixtures.py                     # from ../shared beside the checkout (the committed files)
    python scripts/make_fixtures.py --source DIR        # from another folder laid out like ../shared
    python scripts/make_fixtures.py --hub               # from the Hugging Face Hub (needs network)

A source folder holds data/<name>.jsonl and tokenizers/<model>; the documents are written gzipped,
the tokenizers as they are. The script prints the sha256 table of tests/fixtures/README.md.

From the Hub: the two official tokenizers come from the challenge's dataset repositories (the same
files, so their sha256 match), the documents from the challenge's `docs_selected.jsonl`, read as a
stream: the first 200 as validation, the next 300 and 1,000 as the two training files. These are
not the documents the committed sample holds (its training files come from FineWeb's own
distribution), so the document sha256 change: commit the new table with them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"
# (file name, documents): validation first, then the two training files.
DOCS = (("docs_selected_sample200.jsonl", 200), ("fineweb_default_sample300.jsonl", 300),
        ("fineweb_sample10bt_1000.jsonl", 1000))
TOKENIZERS = ("fineweb_1024_bpe.model", "fineweb_8192_bpe.model")
# Hub locations (the layout pgolf.data.fetch reads; docs/records/record-stack.md §1.2).
HUB_TOKENIZERS = {"fineweb_1024_bpe.model": "willdepueoai/parameter-golf",
                  "fineweb_8192_bpe.model": "kevclark/parameter-golf"}
HUB_DOCS = "datasets/willdepueoai/parameter-golf/datasets/docs_selected.jsonl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gzip_bytes(data: bytes) -> bytes:
    """Reproducible gzip: no file name, no time stamp."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def _check_docs(name: str, data: bytes, n: int) -> None:
    lines = data.decode("utf-8").splitlines()
    if len(lines) != n or not all(isinstance(json.loads(x).get("text"), str) for x in lines):
        sys.exit(f"make_fixtures: {name}: expected {n} JSON lines with a 'text' field")


def from_dir(src: Path) -> dict[str, bytes]:
    """{relative path in the fixture: contents before compression} from a folder laid out like ../shared."""
    files = {}
    for rel in [f"data/{n}" for n, _ in DOCS] + [f"tokenizers/{t}" for t in TOKENIZERS]:
        path = src / rel
        if not path.is_file():
            sys.exit(f"make_fixtures: {path} not found (is --source a folder with data/ and tokenizers/?)")
        files[rel] = path.read_bytes()
    return files


def _hub_download(repo_id: str, filename: str) -> bytes:  # tests replace this
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset")).read_bytes()


def _hub_lines(path: str, n: int) -> list[bytes]:  # tests replace this
    """The first n lines of a Hub file, streamed (docs_selected.jsonl is many GB)."""
    from huggingface_hub import HfFileSystem

    with HfFileSystem().open(path, "rb") as f:
        return [f.readline() for _ in range(n)]


def from_hub() -> dict[str, bytes]:
    files = {f"tokenizers/{t}": _hub_download(repo, f"datasets/tokenizers/{t}") for t, repo in HUB_TOKENIZERS.items()}
    lines = _hub_lines(HUB_DOCS, sum(n for _, n in DOCS))
    start = 0
    for name, n in DOCS:
        # keep only "text": the challenge's lines may carry more fields than the tests need
        texts = [json.dumps({"text": json.loads(x)["text"]}, ensure_ascii=False) for x in lines[start:start + n]]
        files[f"data/{name}"] = ("\n".join(texts) + "\n").encode("utf-8")
        start += n
    return files


def write(files: dict[str, bytes], out: Path) -> list[tuple[str, str, int]]:
    """Write the fixture; returns (path, sha256 of the contents, bytes on disk) per file."""
    rows = []
    for rel, data in files.items():
        if rel.startswith("data/"):
            _check_docs(rel, data, dict(DOCS)[Path(rel).name])
            stored, rel_out = gzip_bytes(data), rel + ".gz"
        else:
            stored, rel_out = data, rel
        path = out / rel_out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(stored)
        tmp.replace(path)
        rows.append((rel_out, sha256(data), len(stored)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, default=ROOT.parent / "shared", help="folder laid out like ../shared")
    src.add_argument("--hub", action="store_true", help="download from the Hugging Face Hub instead")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    files = from_hub() if args.hub else from_dir(args.source)
    rows = write(files, args.out)
    print("| file | sha256 (uncompressed) | bytes in the repository |\n|---|---|---|")
    for rel, digest, size in rows:
        print(f"| `{rel}` | `{digest}` | {size:,} |")
    print(f"total: {sum(r[2] for r in rows):,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
