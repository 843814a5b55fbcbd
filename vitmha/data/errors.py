"""Errors raised by vitmha's data modules."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

Problem = Tuple[str, str]  # (path, what is wrong)


class DataValidationError(ValueError):
    """The data on disk is not usable; the message lists every problem, one per line, path first.

    ``problems`` holds the same list as ``(path, message)`` pairs.
    """

    def __init__(self, problems: Sequence[Problem], header: str = ""):
        self.problems: List[Problem] = list(problems)
        lines = [f"{path}: {msg}" for path, msg in self.problems]
        if header:
            lines.insert(0, header)
        super().__init__("\n".join(lines))


class DatasetNotInstalledError(FileNotFoundError):
    """An optional dataset's files are missing; ``install`` says how to get them."""

    def __init__(self, name: str, install: str, looked_in: Sequence[str] = ()):
        self.name = name
        self.install = install
        where = f" (looked in: {', '.join(str(p) for p in looked_in)})" if looked_in else ""
        super().__init__(f"{name} is not installed{where}. Install it with: {install}")


def require_dataset(fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)``; in a pytest run turn a missing dataset into a skip.

    The skip reason is the install command. With ``VITMHA_REQUIRE_DATA=1`` the error is raised
    instead, so CI that installed the data fails loudly when it is missing.
    """
    try:
        return fn(*args, **kwargs)
    except DatasetNotInstalledError as e:
        if os.environ.get("VITMHA_REQUIRE_DATA", "") not in ("", "0"):
            raise
        import pytest

        pytest.skip(f"{e.name} not installed: {e.install}")
