#!/usr/bin/env python
"""`python tools/parity.py ARGS` runs `vitmha parity ARGS` (see `vitmha parity --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["parity", *sys.argv[1:]])
