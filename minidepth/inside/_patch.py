"""Observe a pipeline without changing it: wrap one of its step methods on the instance, for the length of a block.

The wrapper calls the original with the same arguments and returns its result untouched; an instance attribute
shadows the class's method (as `minidepth generate` does to time the steps), and leaving the block restores it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable


@contextlib.contextmanager
def observe_method(obj, name: str, before: Callable[[dict], None] | None = None,
                   after: Callable[[dict, object], None] | None = None):
    """Call `before(arguments)` and `after(arguments, result)` around every `obj.<name>(...)` call, where
    `arguments` maps each parameter name to its value (defaults filled in)."""
    had_own = name in vars(obj)
    original = getattr(obj, name)  # may itself be a wrapper (e.g. the CLI's timers), so the arguments are named
    signature = inspect.signature(getattr(type(obj), name))  # by the class's method: (self, ...)

    def wrapper(*args, **kwargs):
        bound = signature.bind(obj, *args, **kwargs)
        bound.apply_defaults()
        if before is not None:
            before(bound.arguments)
        result = original(*args, **kwargs)
        if after is not None:
            after(bound.arguments, result)
        return result
    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)
