"""The one exception type a user sees: a one-line message, no traceback, exit code 1."""


class UserError(Exception):
    """Bad input a user can fix (path, option, file content). The CLI prints it on one line."""
