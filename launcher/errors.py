"""Errors that end a run with a message instead of a traceback."""


class LauncherError(Exception):
    """A failure explained by its message alone; the launcher prints it and exits with ``exit_code``.

    ``same_on_all_ranks`` marks errors every rank raises identically (config errors, errors agreed on through a
    collective), so only rank 0 prints them and the log shows each once.
    """

    exit_code = 1
    prefix = "error: "

    def __init__(self, message: str, same_on_all_ranks: bool = False):
        super().__init__(message)
        self.same_on_all_ranks = same_on_all_ranks


class UserError(LauncherError):
    """Something the user typed or provided (config, recipe, data) is wrong; the message says what would work."""

    exit_code = 2


class PeerFailed(LauncherError):
    """This rank stopped because another one failed or died: that rank's error is the root cause, not this."""
