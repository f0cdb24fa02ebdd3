"""Download the published challenge export from the Hugging Face Hub, verifying every file.

Layout of the official export (openai/parameter-golf `data/cached_challenge_fineweb.py`), inside
the dataset repository: `datasets/manifest.json` (per dataset: `stats.files_train/files_val`,
`tokenizer_name`; per tokenizer: `model_path`), shards under
`datasets/datasets/fineweb10B_<variant>/fineweb_{val,train}_XXXXXX.bin`, and the tokenizer under
`datasets/tokenizers/`. SP1024 lives in `willdepueoai/parameter-golf`, SP8192 in
`kevclark/parameter-golf` (docs/records/record-stack.md §1.2), and the CaseOps SP8192 export the #1736-#1855
records train on in `romeerp/parameter-golf-caseops-v1` (same layout, plus the validation byte
sidecars `fineweb_val_bytes_XXXXXX.bin`, one per val shard, which scoring uses instead of the LUTs).

Everything lands flat in one folder (shards, `tokenizer.model`, the Hub's `hub_manifest.json`, and
pgolf's own `manifest.json`), the same shape `pgolf data build` writes. A download is first
written to a staging folder and moved into place only after it passes its checks (header and size
for shards, the Hub's LFS size and sha256 where published); a 0-byte or partial file is deleted
and fetched again, a bounded number of times, and never used.

A new `--out` appears only complete: the files gather in a sibling `.<name>.partial` that is renamed to
`--out` once everything is verified (a failed fetch keeps what it verified there, and the next fetch
resumes from it). An existing `--out` is completed in place, one verified file at a time, its
manifest rewritten last.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pgolf.data import shards
from pgolf.data.build import MANIFEST, TOKENIZER, log
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import PgolfError, describe
from pgolf.fileio import atomic_write_json, check_output, sha256_file

VARIANTS: dict[str, dict[str, Any]] = {
    "sp1024": {"repo_id": "willdepueoai/parameter-golf", "dataset": "fineweb10B_sp1024", "vocab_size": 1024},
    "sp8192": {"repo_id": "kevclark/parameter-golf", "dataset": "fineweb10B_sp8192", "vocab_size": 8192},
    "sp8192-caseops": {"repo_id": "romeerp/parameter-golf-caseops-v1",
                       "dataset": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "vocab_size": 8192,
                       "tokenizer": "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
                       "caseops": True},
}
REMOTE_ROOT = "datasets"
HUB_MANIFEST = "hub_manifest.json"
TRIES = 3


def _download(repo_id: str, remote_path: str, staging: Path) -> Path:
    """One file from the Hub into `staging`; returns where it landed. (Tests replace this.)"""
    from huggingface_hub import hf_hub_download

    # force_download: a retry must really fetch again, not trust the local_dir metadata
    return Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset",
                                local_dir=staging, force_download=True))


def _remote_info(repo_id: str, paths: list[str]) -> dict[str, tuple[int | None, str | None]]:
    """{path: (size, sha256)} as the Hub publishes them (sha256 for LFS files); {} if it cannot say."""
    from huggingface_hub import HfApi

    try:
        infos = HfApi().get_paths_info(repo_id, paths, repo_type="dataset")
    except Exception as e:  # metadata is a bonus check; the header/size checks still run
        log(f"could not read file metadata from {repo_id} ({describe(e)}); checking headers and sizes only")
        return {}
    out = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        out[info.path] = (getattr(info, "size", None), getattr(lfs, "sha256", None) if lfs else None)
    return out


def _check(path: Path, kind: str, expect: tuple[int | None, str | None], vocab_size: int) -> None:
    """Raise PgolfError unless `path` is a complete, well-formed file of `kind`."""
    size, sha = expect
    actual = path.stat().st_size
    if actual == 0:
        raise PgolfError(f"{path.name}: empty (0-byte) download")
    if size is not None and actual != size:
        raise PgolfError(f"{path.name}: {actual} bytes, the Hub lists {size} (partial download)")
    if sha is not None and sha256_file(path) != sha:
        raise PgolfError(f"{path.name}: sha256 differs from the Hub's")
    if kind == "shard":
        shards.read_shard(path, vocab_size)
    elif kind == "sidecar":
        shards.read_header(path)  # byte counts, not token ids: header and size only
    elif kind == "tokenizer":
        n = load_tokenizer(path).vocab_size()
        if n != vocab_size:
            raise PgolfError(f"{path.name}: tokenizer vocabulary {n}, expected {vocab_size}")
    else:
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PgolfError(f"{path.name}: not valid JSON (partial download?)") from None


def _fetch_file(repo_id: str, remote: str, dest: Path, kind: str, expect, vocab_size: int,
                staging: Path, tries: int) -> bool:
    """Make `dest` a verified copy of `remote`; returns True if it had to be downloaded."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    if dest.exists():
        try:
            _check(dest, kind, expect, vocab_size)
            return False
        except PgolfError as e:
            log(f"{e}; deleting it and fetching again")
            dest.unlink()
    why = ""
    for attempt in range(1, tries + 1):
        try:
            got = _download(repo_id, remote, staging)
        except (EntryNotFoundError, RepositoryNotFoundError):
            raise PgolfError(f"{repo_id}/{remote}: not found on the Hugging Face Hub") from None
        except Exception as e:  # network errors: retry
            why = describe(e)
            log(f"{remote}: download failed ({why}), try {attempt}/{tries}")
            continue
        try:
            _check(got, kind, expect, vocab_size)
        except PgolfError as e:
            why = str(e)
            log(f"{why}; deleted, try {attempt}/{tries}")
            got.unlink(missing_ok=True)
            continue
        os.replace(got, dest)
        return True
    raise PgolfError(f"{repo_id}/{remote}: no good copy after {tries} tries (last: {why})")


def fetch(variant: str = "sp1024", train_shards: int = 80, out: str | Path | None = None,
          repo_id: str | None = None, tries: int = TRIES) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise PgolfError(f"--variant {variant}: expected one of {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    repo_id = repo_id or spec["repo_id"]
    vocab = spec["vocab_size"]
    if train_shards < 0:
        raise PgolfError(f"--train-shards {train_shards}: must be >= 0")
    out = check_output(Path(out) if out else Path("data") / spec["dataset"], "--out", kind="dir")
    # a new folder becomes visible only once complete; an existing one is completed in place
    work = out if out.is_dir() else out.absolute().parent / f".{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = _fetch_into(work, spec, variant, repo_id, vocab, train_shards, tries)
    except BaseException as e:
        if work != out:
            if not any(work.iterdir()):
                work.rmdir()
            elif isinstance(e, PgolfError):
                raise PgolfError(f"{e} (the files verified so far are kept in {work}; "
                                 "the next fetch resumes from them)") from None
        raise
    if work != out:
        os.rename(work, out)
    return {**res, "out": str(out)}


def _fetch_into(out: Path, spec: dict, variant: str, repo_id: str, vocab: int, train_shards: int,
                tries: int) -> dict[str, Any]:
    """Every file of the export into `out`, verified, then pgolf's manifest; the CLI's result."""
    staging = out / ".fetch-staging"
    staging.mkdir(exist_ok=True)
    try:
        # 1. the export's manifest says how many shards exist and where the tokenizer is
        remote_manifest = f"{REMOTE_ROOT}/manifest.json"
        info = _remote_info(repo_id, [remote_manifest])
        downloaded: int = _fetch_file(repo_id, remote_manifest, out / HUB_MANIFEST, "json",
                                 info.get(remote_manifest, (None, None)), vocab, staging, tries)
        hub = json.loads((out / HUB_MANIFEST).read_text())
        entry = next((d for d in hub.get("datasets", []) if d.get("name") == spec["dataset"]), None)
        if entry is None:
            raise PgolfError(f"{repo_id}/{remote_manifest}: no dataset named {spec['dataset']}")
        stats = entry.get("stats") or {}
        n_val, n_train = int(stats.get("files_val", 1)), int(stats.get("files_train", train_shards))
        if train_shards > n_train:
            raise PgolfError(f"--train-shards {train_shards}: {repo_id} publishes only {n_train} for {variant}")
        tok: dict[str, Any] = next(
            (t for t in hub.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
        default_tok = spec.get("tokenizer", f"tokenizers/fineweb_{vocab}_bpe.model")
        tok_remote = f"{REMOTE_ROOT}/{tok.get('model_path') or default_tok}"

        # 2. every file, verified, moved into place only when good
        prefix = f"{REMOTE_ROOT}/datasets/{spec['dataset']}"
        files = [(f"{prefix}/fineweb_val_{i:06d}.bin", f"fineweb_val_{i:06d}.bin", "shard") for i in range(n_val)]
        if spec.get("caseops"):
            files += [(f"{prefix}/fineweb_val_bytes_{i:06d}.bin", f"fineweb_val_bytes_{i:06d}.bin", "sidecar")
                      for i in range(n_val)]
        files += [(f"{prefix}/fineweb_train_{i:06d}.bin", f"fineweb_train_{i:06d}.bin", "shard")
                  for i in range(train_shards)]
        files.append((tok_remote, TOKENIZER, "tokenizer"))
        info = _remote_info(repo_id, [r for r, _, _ in files])
        for k, (remote, name, kind) in enumerate(files, 1):
            got = _fetch_file(repo_id, remote, out / name, kind, info.get(remote, (None, None)), vocab, staging, tries)
            downloaded += got
            log(f"[{k}/{len(files)}] {name} {'downloaded' if got else 'already present'}, verified")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    names = [name for _, name, kind in files if kind in ("shard", "sidecar")]
    for i in range(n_val if spec.get("caseops") else 0):  # a sidecar runs parallel to its val shard
        a, b = (shards.read_header(out / f"fineweb_val{x}_{i:06d}.bin") for x in ("", "_bytes"))
        if a != b:
            raise PgolfError(f"{out}/fineweb_val_bytes_{i:06d}.bin: {b} entries for the {a} tokens of its val shard")
    # the Hub's sha256 was checked against each file above; hash locally only where it published none
    sha = {name: info.get(remote, (None, None))[1] or sha256_file(out / name) for remote, name, _ in files}
    manifest = {
        "format": "pgolf-shards/1",
        "vocab_size": vocab,
        "bos_id": 1,
        "append_eos": False,
        "text_transform": "lossless_caps_caseops_v1" if spec.get("caseops") else None,
        "tokenizer": {"file": TOKENIZER, "sha256": sha[TOKENIZER], "source": f"{repo_id}/{tok_remote}",
                      "trained": False},
        "documents": {"val": stats.get("docs_val"), "train": stats.get("docs_train")},
        "tokens": {s: sum(shards.read_header(out / n) for n in names
                          if n.startswith(f"fineweb_{s}_") and "_bytes_" not in n) for s in ("val", "train")},
        "shards": {n: {"tokens": shards.read_header(out / n), "sha256": sha[n]} for n in names},
        "sources": [{"hub": repo_id, "variant": variant, "dataset": spec["dataset"],
                     "train_shards": train_shards, "published_train_shards": n_train}],
    }
    atomic_write_json(out / MANIFEST, manifest)
    all_files = [out / HUB_MANIFEST, out / MANIFEST] + [out / name for _, name, _ in files]
    return {"out": str(out), "files": len(all_files), "bytes": sum(f.stat().st_size for f in all_files),
            "downloaded": int(downloaded), "variant": variant, "repo_id": repo_id,
            "train_shards": train_shards, "val_shards": n_val}
