"""The one exception type that the command line turns into a single clear line on stderr, and the one
way a stop signal reaches the code (`Terminated`, raised inside `sigterm_raises()`)."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class PgolfError(Exception):
    """A user-facing error: bad input, a corrupt file, an unknown key.

    The message names the file or key and what is wrong. The CLI prints it as one line
    (`pgolf: error: <message>`) and exits non-zero; `--debug` shows the traceback.
    """


class LegalityError(PgolfError):
    """An evaluation broke one of the challenge's conditions (Issue #1017): a bug in an evaluation
    method or a distribution that is not normalised. Reported like any pgolf error (one line, exit 2)."""


class Terminated(BaseException):
    """SIGTERM arrived (torchrun, Slurm and `pgolf.lab.launch` send it to stop a job).

    Raised by the handler `pgolf.cli.main` installs, so a run stops the way Ctrl-C stops it: like
    KeyboardInterrupt it is not an `Exception`, cleanup in `finally` / `except BaseException` runs, the
    run is recorded as interrupted (never finished) and the command exits 143 (128 + SIGTERM)."""

    def __str__(self) -> str:
        return "SIGTERM"


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread (only it may install a handler;
    elsewhere nothing changes). The previous handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def describe(e: BaseException) -> str:
    """`Type: message` of `e` and of each distinct cause under it, on one line (the first line of each
    message), so a wrapper's message ("... failed due to the above error") never hides the error that
    explains it."""
    parts: list[str] = []
    seen: set[str] = set()
    cur: BaseException | None = e
    while cur is not None and len(parts) < 5:
        msg = next((x.strip() for x in str(cur).splitlines() if x.strip()), "")
        if msg not in seen:
            seen.add(msg)
            parts.append(f"{type(cur).__name__}: {msg}" if msg else type(cur).__name__)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return " <- ".join(parts)
