"""Check what a reader finds after every step of a writer: each rename, exchange and removal."""

from __future__ import annotations

import os
from collections.abc import Callable

from streamgen import folders

STEPS = ("replace", "rename", "unlink", "remove", "rmdir")


def check_after_each_file_step(monkeypatch, check: Callable[[str], None]) -> list[str]:
    """Make every os rename/removal and `folders.exchange` call `check(after)` once it is done
    (`after` names the step; a step the check itself takes is not checked again). Returns the
    steps checked so far (a list that grows); `monkeypatch.undo()` ends it."""
    seen: list[str] = []
    checking: list[int] = []

    def checked(real):
        def step(*args, **kwargs):
            result = real(*args, **kwargs)
            if not checking:
                checking.append(1)
                try:
                    after = f"after {real.__name__}{tuple(str(a) for a in args)}"
                    check(after)
                    seen.append(after)
                finally:
                    checking.clear()
            return result

        return step

    for name in STEPS:
        monkeypatch.setattr(os, name, checked(getattr(os, name)))
    monkeypatch.setattr(folders, "exchange", checked(folders.exchange))
    return seen
