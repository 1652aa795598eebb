"""The one error type of the front ends: a problem to report in one line, with an exit status."""


class CLIError(Exception):
    """A problem to report in one line; `code` is the exit status (2: a bad option value, 1: anything else)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
