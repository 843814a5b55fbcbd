"""One rule for which errors are the user's (printed as one line) and which are bugs (traceback)."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from typing import Any, Callable, Optional


def user_error(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The user-facing error behind ``exc``, if any: an exception class defined in vitmha (bad data,
    unreadable weights, a tool's bad argument), a missing file, or a diverged run (FloatingPointError
    naming the epoch and step).

    jsonargparse re-raises errors from a class's ``__init__`` as its own ValueError ``from`` the original,
    so explicit causes are followed; implicit contexts are not (a bug while handling an error stays a bug).
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, FloatingPointError)) or any(
                cls.__module__.split(".")[0] == "vitmha" for cls in type(exc).__mro__):
            return exc
        exc = exc.__cause__
    return None


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's entry point: user-facing errors print ``error: ...`` and exit 2
    (``VITMHA_TRACEBACK=1`` shows the traceback instead); other exceptions propagate. The warning filters and
    the Lightning logger's level a command sets for its own output are put back when it returns, so a command
    called from Python (``main(argv)``) leaves the caller's logging as it was."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        try:
            with warnings.catch_warnings():
                return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - narrowed right below
            err = user_error(exc)
            if err is None or os.environ.get("VITMHA_TRACEBACK"):
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            lightning_log.setLevel(level)

    return wrapper
