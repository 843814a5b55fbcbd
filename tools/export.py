#!/usr/bin/env python
"""`python tools/export.py ARGS` runs `vitmha export ARGS` (see `vitmha export --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["export", *sys.argv[1:]])
