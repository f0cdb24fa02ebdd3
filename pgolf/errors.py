"""The one exception type that the command line turns into a single clear line on stderr."""


class PgolfError(Exception):
    """A user-facing error: bad input, a corrupt file, an unknown key.

    The message names the file or key and what is wrong. The CLI prints it as one line
    (`pgolf: error: <message>`) and exits non-zero; `--debug` shows the traceback.
    """
