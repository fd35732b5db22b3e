"""The one exception type a user sees: a one-line message, no traceback, exit code 1."""


class UserError(Exception):
    """Bad input a user can fix (path, option, file content). The CLI prints it on one line."""


def problems_error(problems: list[str]) -> UserError:
    """One error for a list of dataset problems: the first, and how many more there are."""
    more = f" (and {len(problems) - 1} more: run memseg data check)" if len(problems) > 1 else ""
    return UserError(f"{problems[0]}{more}")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
