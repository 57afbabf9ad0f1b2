"""The exceptions a user sees as a clean one-line error, typed by kind so that an interface can answer
each the right way (the CLI prints one line and exits 1; a server picks the HTTP status)."""


class UserError(Exception):
    """Bad input from the user: a missing file, an unknown name, an out-of-range value.

    The CLI prints ``error: <message>`` on one line and exits non-zero, with no traceback.
    """


class BadRequest(UserError):
    """A request that can never succeed as given: an out-of-range value, an option that does not apply."""


class NotFound(UserError):
    """A run, a file or a name that does not exist."""


class Conflict(UserError):
    """A request that clashes with what exists: a run name that is taken, a run that is still training."""


class TooLarge(UserError):
    """An upload or a request body over the size the server accepts (a server answers 413)."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint (not a user error: the CLI exits 130)."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved, continue with --resume")
        self.step = step


class Cancelled(Exception):
    """Work stopped because whoever asked for it is gone (a server's client disconnected)."""
