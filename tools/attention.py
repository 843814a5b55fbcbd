#!/usr/bin/env python
"""`python tools/attention.py ARGS` runs `vitmha attention ARGS` (see `vitmha attention --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["attention", *sys.argv[1:]])
