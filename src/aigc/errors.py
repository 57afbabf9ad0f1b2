"""The one exception type a user sees as a clean one-line error."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, an out-of-range value.

    The CLI prints ``error: <message>`` on one line and exits non-zero, with no traceback.
    """
