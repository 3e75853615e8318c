"""The one exception type a user can cause.

Every mistake a user can make (a bad path, a malformed file, an unknown architecture, an
out-of-range flag) raises MinillmError with a message that says what went wrong and what to do.
The CLI prints that message on one line and exits non-zero; library users catch one type.
"""


class MinillmError(Exception):
    """A user-facing error: the message is complete, no traceback is needed."""
