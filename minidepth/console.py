"""Messages for people on stderr, shared by the library's long jobs (training) and the front ends."""

from __future__ import annotations

import sys


class Console:
    """stderr for people: information lines (silenced by --quiet), one-line warnings (always)."""

    def __init__(self, prog: str, quiet: bool = False):
        self.prog, self.quiet = prog, quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"{self.prog}: warning: {message}", file=sys.stderr, flush=True)
