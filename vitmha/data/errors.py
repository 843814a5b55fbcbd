"""Errors raised by vitmha's data modules."""
from __future__ import annotations

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
