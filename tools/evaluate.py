#!/usr/bin/env python
"""`python tools/evaluate.py ARGS` runs `vitmha evaluate ARGS` (see `vitmha evaluate --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["evaluate", *sys.argv[1:]])
