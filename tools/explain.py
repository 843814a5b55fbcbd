#!/usr/bin/env python
"""`python tools/explain.py ARGS` runs `vitmha explain ARGS` (see `vitmha explain --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["explain", *sys.argv[1:]])
