"""The one exception type that the command line turns into a single clear line on stderr."""


class PgolfError(Exception):
    """A user-facing error: bad input, a corrupt file, an unknown key.

    The message names the file or key and what is wrong. The CLI prints it as one line
    (`pgolf: error: <message>`) and exits non-zero; `--debug` shows the traceback.
    """


class LegalityError(PgolfError):
    """An evaluation broke one of the challenge's conditions (Issue #1017): a bug in an evaluation
    method or a distribution that is not normalised. Reported like any pgolf error (one line, exit 2)."""
