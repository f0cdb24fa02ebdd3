"""The one exception type that the command line turns into a single clear line on stderr."""


class PgolfError(Exception):
    """A user-facing error: bad input, a corrupt file, an unknown key.

    The message names the file or key and what is wrong. The CLI prints it as one line
    (`pgolf: error: <message>`) and exits non-zero; `--debug` shows the traceback.
    """


class LegalityError(PgolfError):
    """An evaluation broke one of the challenge's conditions (Issue #1017): a bug in an evaluation
    method or a distribution that is not normalised. Reported like any pgolf error (one line, exit 2)."""


def describe(e: BaseException) -> str:
    """`Type: message` of `e` and of each distinct cause under it, on one line (the first line of each
    message), so a wrapper's message ("... failed due to the above error") never hides the error that
    explains it."""
    parts, seen = [], set()
    while e is not None and len(parts) < 5:
        msg = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
        if msg not in seen:
            seen.add(msg)
            parts.append(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " <- ".join(parts)
