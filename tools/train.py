#!/usr/bin/env python
"""Train a vitmha model from a YAML recipe.

    python tools/train.py --config configs/quickstart.yaml [--section.key value ...] [--ckpt_path C]

This is ``vitmha fit``: the same parser, options and defaults (run ``python tools/train.py --help`` for
all of them). ``--ckpt_path path/to/last.ckpt`` resumes a run exactly where it stopped. Runs from a
clone with the package installed (``pip install -e .``) or from the repository root without it.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "vitmha")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # this checkout's vitmha, installed or not

from vitmha.cli import cli_main  # noqa: E402


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``vitmha fit`` with ``argv`` (default ``sys.argv[1:]``); a leading ``fit`` is accepted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["fit"]:
        argv.insert(0, "fit")
    cli_main(argv)


if __name__ == "__main__":
    main()
