"""The one exception type users see as a single line (the CLI prints it and exits non-zero)."""


class CnmError(Exception):
    """A user-facing failure: bad input, a missing back-end, an impossible flag combination.

    The message is one line that says what is wrong and, where possible, what to do. The CLI
    prints `error: <message>` and exits with status 1, with no traceback.
    """
