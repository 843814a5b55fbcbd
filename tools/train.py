#!/usr/bin/env python
"""Train a vitmha model from a YAML recipe: ``python tools/train.py --config configs/X.yaml [--section.key value ...]``.

The same as ``vitmha fit`` (run ``python tools/train.py --help`` for every option); a leading ``fit`` is
accepted. ``--ckpt_path path/to/last.ckpt`` (or ``last``) resumes a run exactly where it stopped.
"""
from __future__ import annotations

import sys
from typing import Optional

from vitmha.cli import cli_main


def main(argv: Optional[list[str]] = None) -> None:
    """Run ``vitmha fit`` with ``argv`` (default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli_main(argv if argv[:1] == ["fit"] else ["fit", *argv])


if __name__ == "__main__":
    main()
