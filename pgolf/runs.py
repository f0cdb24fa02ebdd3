"""Run directories and the run registry.

Each run writes `runs/<run_id>/`: `config.json`, `env.json`, `train.log`, `metrics.jsonl`,
`result.json` and its artifacts. JSON files and artifacts are written atomically (temporary file in
the same folder, then `os.replace`), so a reader never sees half a file. A run is *finished* only once
`result.json` says `"status": "finished"`; only then does `index.jsonl` (beside the run directories)
gain a line. Reading the registry back (`pgolf.lab.registry.load()`, a pandas DataFrame) is the lab's.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pgolf.errors import PgolfError
from pgolf.fileio import json_default, atomic_write_bytes, atomic_write_json

INDEX = "index.jsonl"
# Config fields that do not define "the same configuration" when grouping seeds.
_RUN_SPECIFIC = {("train", "seed"), ("data", "path"), ("data", "tokenizer")}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent sweeps append whole lines to the index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def config_key(config: dict[str, Any]) -> str:
    """A short hash of a run's configuration without its seed and data paths (groups seeds)."""
    reduced = {s: {k: v for k, v in sec.items() if (s, k) not in _RUN_SPECIFIC}
               for s, sec in config.items() if isinstance(sec, dict)}
    blob = json.dumps(reduced, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def new_run_id(preset: str, seed: int) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}_{preset}_s{seed}_{os.getpid() % 10000:04d}"


class RunDir:
    """One run's directory. Rank 0 writes; other ranks never touch it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path) -> "RunDir":
        run = cls(path)
        if run.is_finished():
            raise PgolfError(f"{run.path}: already holds a finished run (choose another --out)")
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def run_id(self) -> str:
        return self.path.name

    # ---- files
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.file(name), obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.file(name), data)

    def read_json(self, name: str) -> dict[str, Any]:
        p = self.file(name)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise PgolfError(f"{p}: not found (is {self.path} a pgolf run directory?)") from None
        except json.JSONDecodeError as e:
            raise PgolfError(f"{p}: not valid JSON ({e.msg})") from None

    def append_jsonl(self, name: str, obj: dict[str, Any]) -> None:
        """Append one JSON line (metrics, TTT curves): append-only, flushed per line."""
        with open(self.file(name), "a") as f:
            f.write(json.dumps(obj, default=json_default) + "\n")

    def log(self, msg: str, echo: bool = True) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        with open(self.file("train.log"), "a") as f:
            f.write(line + "\n")
        if echo:
            print(line, file=sys.stderr, flush=True)

    def read_metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        p = self.file(name)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    # ---- state
    def result(self) -> dict[str, Any]:
        return self.read_json("result.json") if self.file("result.json").exists() else {}

    def is_finished(self) -> bool:
        try:
            return self.result().get("status") == "finished"
        except PgolfError:
            return False

    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Write result.json with status "finished", then add the run to the index."""
        result = {**result, "status": "finished", "run_id": self.run_id, "run_dir": str(self.path),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.file("config.json").exists():
            result.setdefault("config_key", config_key(self.config()))
        self.write_json("result.json", result)
        index = self.path.parent / INDEX
        line = {k: result.get(k) for k in ("run_id", "run_dir", "preset", "seed", "config_key",
                                            "val_bpb", "finished_at")}
        with _locked(index):
            with open(index, "a") as f:
                f.write(json.dumps(line, default=json_default) + "\n")
        return result

    def update_result(self, updates: dict[str, Any]) -> dict[str, Any]:
        """Merge later results (quantisation, evaluation) into a finished run's result.json."""
        with _locked(self.file("result.json")):
            result = self.result()
            result.update(updates)
            self.write_json("result.json", result)
        return result


def resolve(run_dir: str | Path) -> RunDir:
    run = RunDir(run_dir)
    if not run.file("config.json").exists():
        raise PgolfError(f"{run.path}: not a pgolf run directory (no config.json)")
    return run
