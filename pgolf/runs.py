"""Run directories and the run registry.

Each run writes `runs/<run_id>/`: `config.json`, `env.json`, `train.log`, `metrics.jsonl`,
`result.json` and its artifacts. JSON files and artifacts are written atomically (temporary file in
the same folder, then `os.replace`), so a reader never sees half a file. A run is *finished* only once
`result.json` says `"status": "finished"`; only then does `index.jsonl` (beside the run directories)
gain a line. Reading the registry back (`pgolf.lab.registry.load()`, a pandas DataFrame) is the lab's.

Every score a command takes is also recorded as a *stage* in `result.json` (`stages`, a list, only ever
appended to): which weights were scored (`fp` = final_model.pt, `artifact` = a compressed artifact,
named with its sha256), on how many tokens and bytes, in which setting, by which command and when.
The flat keys (`val_bpb`, `quant_val_bpb`, `ttt_val_bpb`, ...) are the latest of each kind; the
stages keep every one, so a re-quantisation adds a stage instead of erasing the trainer's numbers.
A flat score describes the run's current `artifact` or final_model.pt, never an artifact since
replaced: a new artifact clears its predecessor's flat scores (`replaced_artifact`).
`stages(result)` reads them back; a stage scored on fewer tokens than another is flagged
(`fewer_tokens`), and `stages_comparable` says whether all stages scored the same number of tokens.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pgolf.errors import PgolfError
from pgolf.fileio import atomic_write_bytes, atomic_write_json, json_default, sha256_file

INDEX = "index.jsonl"
# Config fields that do not define "the same configuration" when grouping seeds.
_RUN_SPECIFIC = {("train", "seed"), ("data", "path"), ("data", "tokenizer")}
STAGE_NAMES = ("pre-quant", "quantised", "ttt")
STATUSES = ("finished", "failed", "interrupted")
# result.json keys that hold a number (or null): scores, byte and token counts
_NUMERIC = re.compile(r"(^|_)(val_bpb|val_loss)(_|$)|_bytes$|_tokens$|^(limit|margin|params|steps)$")


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


def move_aside(run_dir: Path, runs_root: Path | None = None) -> Path:
    """Move an unfinished earlier attempt out of the way, kept for inspection under
    `<runs_root>/.failed/<name>-<time>` (runs_root: the folder's parent), so that its logs never mix with
    the next attempt's. Returns where it went."""
    dest = (runs_root or run_dir.parent) / ".failed" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(dest)
    return dest


def moved_aside(run_dir: Path, runs_root: Path | None = None) -> list[Path]:
    """The earlier attempts of `run_dir` that `move_aside` kept (none: an empty list)."""
    return sorted(((runs_root or run_dir.parent) / ".failed").glob(f"{run_dir.name}-[0-9]*"))


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
        except UnicodeDecodeError:
            raise PgolfError(f"{p}: not valid JSON (not UTF-8 text)") from None

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
        """The rows of a JSON-lines log; a last line cut short (a run killed while writing) is left out."""
        p = self.file(name)
        if not p.exists():
            return []
        return read_jsonl(p)

    # ---- state
    def result(self) -> dict[str, Any]:
        """result.json ({} before there is one), checked: an object whose scores and counts are numbers."""
        if not self.file("result.json").exists():
            return {}
        return check_result(self.read_json("result.json"), self.file("result.json"))

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
        result.update(_stage_fields(result.get("stages", [])))
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

    def update_result(self, updates: dict[str, Any], new_stages: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """Merge later results (quantisation, evaluation) into result.json, appending their stages."""
        with _locked(self.file("result.json")):
            result = self.result()
            result.update(updates)
            result.update(_stage_fields(result.get("stages", []) + list(new_stages)))
            self.write_json("result.json", result)
        return result


def resolve(run_dir: str | Path) -> RunDir:
    run = RunDir(run_dir)
    if not run.file("config.json").exists():
        raise PgolfError(f"{run.path}: not a pgolf run directory (no config.json)")
    return run


def open_run(run_dir: str | Path, command: str, allow_unfinished: bool = False) -> tuple[RunDir, dict[str, Any]]:
    """A run for a command that works on a trained run (quantize, eval), and its checked result.json.
    A run that did not finish (interrupted, failed, still training) is refused unless asked."""
    run = resolve(run_dir)
    result = run.result()
    if result.get("status") != "finished" and not allow_unfinished:
        state = f"is {result['status']}" if result.get("status") else "has not finished (no status in result.json)"
        raise PgolfError(f"{run.path}: the run {state}; {command} works on finished runs "
                         "(--allow-unfinished to use its weights anyway)")
    return run, result


def check_overrides(overrides: Sequence[str], allowed: Sequence[str], command: str) -> None:
    """`--set` on a trained run may change how it is processed, never the model it holds (the
    recorded scores must keep matching config.json)."""
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(tuple(allowed)):
            names = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise PgolfError(f"--set {item}: {command} may change only {names} (the model is fixed by the run)")


MOVED_DATA = ("data.path", "data.tokenizer")  # where the run's data lives now: allowed when it is the same data


def check_moved_data(run: "RunDir", cfg: Any, overrides: Sequence[str]) -> None:
    """`--set data.path=` / `data.tokenizer=` on a trained run: its data in another place (moved, or a path
    relative to another folder). Allowed only where it is the run's own data: the same validation shards
    (names and sha256) and the same tokenizer as env.json recorded when the run trained."""
    from pgolf.data.build import default_tokenizer_path
    from pgolf.fileio import sha256_file

    given = [k for k in MOVED_DATA if any(o.split("=", 1)[0].strip() == k for o in overrides)]
    if not given:
        return
    env_path = run.file("env.json")
    try:
        env = json.loads(env_path.read_text())
    except (OSError, ValueError):
        env = {}
    recorded = ((env.get("data") or {}) if isinstance(env, dict) else {}).get("shards")
    if not isinstance(recorded, dict):
        raise PgolfError(f"--set {given[0]}: {env_path} records no shard checksums, so the data cannot be checked "
                         "to be the run's own")

    want = {k: (v or {}).get("sha256") for k, v in recorded.items() if k.startswith("fineweb_val_")}
    folder = Path(cfg.data.path)
    here = {f.name: f for f in folder.glob("fineweb_val_*.bin")}  # the files themselves, not a manifest's word
    if not want or set(here) != set(want) or any(sha256_file(f) != want[n] for n, f in here.items()):
        raise PgolfError(f"--set data.path: {folder} does not hold the validation shards this run was scored on "
                         f"(names and sha256 in {env_path})")
    tok = (env.get("tokenizer") or {}).get("sha256")
    path = Path(cfg.data.tokenizer or default_tokenizer_path(folder))
    if tok and (not path.is_file() or sha256_file(path) != tok):
        raise PgolfError(f"--set data.tokenizer: {path} is not the tokenizer this run used (sha256 in {env_path})")


# ---- reading what runs wrote
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file. Lines that do not parse are left out: a process killed while
    appending cuts its last line short (and the next writer appends after it)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def check_result(result: Any, path: str | Path) -> dict[str, Any]:
    """`result` if it has the shape of a result.json, else one PgolfError naming the file and the key."""
    if not isinstance(result, dict):
        raise PgolfError(f"{path}: holds a JSON {type(result).__name__}, expected an object")
    for key, v in result.items():
        if _NUMERIC.search(key) and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise PgolfError(f"{path}: {key} is {v!r}, expected a number")
    if result.get("status") not in (None, *STATUSES):
        raise PgolfError(f"{path}: status is {result['status']!r}, expected one of {', '.join(STATUSES)}")
    st = result.get("stages", [])
    if not isinstance(st, list) or not all(isinstance(x, dict) for x in st):
        raise PgolfError(f"{path}: stages is not a list of objects")
    return result


# ---- stages: every score with what it was measured on
def setting(seq_len: int, stride: int = 0, doc_mask: bool = False) -> str:
    """How a score windowed the validation set (stride 0: non-overlapping windows)."""
    return f"seq_len={seq_len} stride={stride} doc_mask={int(doc_mask)}"


def stage(name: str, score: dict[str, Any] | None, *, by: str, weights: str, setting: str | None,
          artifact: str | None = None, method: str | None = None, **extra: Any) -> dict[str, Any]:
    """One stage record. `score` is a scorer's result (val_bpb, val_loss, tokens, bytes) or None when
    the weights were written but not scored (`pgolf quantize --no-eval`)."""
    if name not in STAGE_NAMES:
        raise ValueError(f"stage name {name!r}: expected one of {STAGE_NAMES}")
    score = score or {}
    return {"name": name, "by": by, "weights": weights, "artifact": artifact, "method": method, "setting": setting,
            "val_bpb": score.get("val_bpb"), "val_loss": score.get("val_loss"), "tokens": score.get("tokens"),
            "bytes": score.get("bytes"), **extra, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def artifact_stage(name: str, score: dict[str, Any] | None, artifact: str | Path, run_dir: str | Path,
                   **fields: Any) -> dict[str, Any]:
    """A stage for a score of the artifact file `artifact`, with its sha256 (so a later file of the same
    name is told apart); named by its file name when it lies in the run directory."""
    path = Path(artifact)
    where = path.name if path.parent.resolve() == Path(run_dir).resolve() else str(path)
    return stage(name, score, weights="artifact", artifact=where, artifact_sha256=sha256_file(path), **fields)


def stages(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A result's stages, oldest first, each flagged `fewer_tokens` when another stage of the run scored
    more tokens (such scores do not compare like with like)."""
    return _stage_fields(result.get("stages", []))["stages"]


# Flat keys that score the run's artifact (`artifact`): the trainer's export, the last `pgolf quantize`
# evaluation, and a `pgolf eval` of an artifact (the eval_* / ttt_* group, unless its weights were fp).
_ARTIFACT_SCORES = ("quant_val_bpb", "quant_val_loss", "quant_val_tokens", "quant_delta_bpb",
                    "artifact_val_bpb", "artifact_val_loss", "artifact_val_tokens", "artifact_val_bytes")
_EVAL_GROUP = ("val_bpb", "val_loss", "val_tokens", "eval_seconds", "artifact", "weights")
_TTT_GROUP = ("ttt_method", "ttt_val_bpb_no_ttt", "ttt_updates", "ttt_fallback")


def artifact_sha256(result: dict[str, Any]) -> str | None:
    """The sha256 of the run's current `artifact`, as the latest stage naming that file recorded it."""
    art = result.get("artifact")
    named = [s.get("artifact_sha256") for s in result.get("stages") or []
             if art and isinstance(s, dict) and s.get("artifact") == Path(str(art)).name and s.get("artifact_sha256")]
    return named[-1] if named else None


def replaced_artifact(result: dict[str, Any], sha256: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new artifact (of `sha256`) replaces the run's `artifact`: (the result.json updates after which no
    flat score describes the old one as if it were the new one, the values those updates replace). The
    old artifact's scores are cleared (its stages keep them); a `val_bpb` / `val_loss` that scored it goes
    back to the trainer's score of final_model.pt (`val_bpb_train`), which a new artifact leaves true.
    The very same bytes again replace nothing."""
    if sha256 is not None and artifact_sha256(result) == sha256:
        return {}, {}
    keys = [k for k in _ARTIFACT_SCORES if result.get(k) is not None]
    for prefix in ("eval_", "ttt_"):
        if result.get(f"{prefix}val_bpb") is not None and result.get(f"{prefix}weights") != "fp":
            group = [prefix + k for k in _EVAL_GROUP] + list(_TTT_GROUP if prefix == "ttt_" else ())
            keys += [k for k in group if k in result]
    updates: dict[str, Any] = dict.fromkeys(keys)
    if _scores_artifact(result):
        train = _latest(result, weights="fp", val_bpb=result.get("val_bpb_train"))
        updates.update(val_bpb=result.get("val_bpb_train"), val_loss=train and train.get("val_loss"))
    old = {k: result.get(k) for k, v in updates.items() if result.get(k) != v}
    return {k: updates[k] for k in old}, old


def _scores_artifact(result: dict[str, Any]) -> bool:
    """Whether `val_bpb` is an artifact's score (a quantize evaluation, a record's TTT score), not the
    trainer's of final_model.pt: the stage it came from says so (else: it differs from `val_bpb_train`)."""
    if result.get("val_bpb") is None:
        return False
    st = _latest(result, val_bpb=result["val_bpb"])
    if st is not None:
        return st.get("weights") == "artifact"
    return "val_bpb_train" in result and result["val_bpb"] != result["val_bpb_train"]


def _latest(result: dict[str, Any], **match: Any) -> dict[str, Any] | None:
    """The latest recorded stage whose fields equal `match` (None when none does)."""
    st = result.get("stages")
    found = [s for s in st if isinstance(s, dict) and all(s.get(k) == v for k, v in match.items())] \
        if isinstance(st, list) else []
    return found[-1] if found else None


def _stage_fields(recorded: list[dict[str, Any]]) -> dict[str, Any]:
    counts = [s["tokens"] for s in recorded if s.get("tokens")]
    top = max(counts, default=0)
    out = [{**s, "fewer_tokens": bool(s.get("tokens")) and s["tokens"] < top} for s in recorded]
    return {"stages": out, "stages_comparable": len(set(counts)) <= 1}
