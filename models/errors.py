"""The one error type for input a user must fix. It lives at the bottom layer so models/ can raise it
without importing hal/ (imports point down: launch -> trainer -> hal -> models); hal.base re-exports it."""


class UserError(Exception):
    """A problem the user fixes by changing a config value, a path or an install: printed as one line,
    and the process exits with `exit_code`."""
    exit_code = 2
