"""Atomic writes, staged folders, output-path checks and file hashes: the one implementation every
module uses.

A reader sees either the old file or the complete new one, never half a file: data goes to a
temporary file in the same folder, is flushed to disk, then renamed onto the target. A folder is
built the same way (`staged_dir`): in a temporary sibling that takes the target's place only once it
is complete. Output paths are checked (`check_output`) before a command starts its work, so a bad
`--out` or `--trace` fails in one line instead of after the computation.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pgolf.errors import PgolfError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # durable before it becomes visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait while the body runs (a command publishing several files): one that
    arrives meanwhile is noted and raised again right after, with the handlers that were there before,
    so an interrupt never leaves half the outputs published. Python handlers rather than a signal mask:
    a masked signal can still land on one of torch's threads. Only the main thread can do this; on
    another the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    before = {s: signal.signal(s, lambda n, _frame: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`. When the body succeeds it takes `path`'s place
    (an old folder there is renamed aside first, then removed); when it fails or is interrupted it is
    removed and `path` is untouched. Between the two renames `path` is briefly absent, never partial;
    a process killed right there leaves the old folder as `.<name>.*.old`."""
    path = Path(path).resolve()  # through a symlink: the folder it points to is the one replaced
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        mask = os.umask(0o022)  # the umask can only be read by setting it: set it straight back
        os.umask(mask)
        # mkdtemp makes 0700: the folder gets the old one's mode, else what a plain mkdir would give it
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.is_dir() else 0o777 & ~mask)
        with signals_deferred():
            if path.exists():
                old = tmp.with_suffix(".old")
                os.rename(path, old)
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output(path: str | Path, what: str, *, kind: str = "file") -> Path:
    """Fail now, in one line naming `what` and the path, if `path` cannot be written as a `kind`
    ("file" or "dir"): it is the other kind, a parent is a file, or the nearest existing folder
    cannot be written to (probed by creating and removing a file; permissions alone mislead root)."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise PgolfError(f"{what} {path}: is a directory (expected a file path)")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise PgolfError(f"{what} {path}: exists and is not a directory")
    probe = path if kind == "dir" and path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PgolfError(f"{what} {path}: {probe} is a file, so nothing can be created under it")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".pgolf-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise PgolfError(f"{what} {path}: {probe} is not writable ({e.strerror})") from None
    return path


def json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
