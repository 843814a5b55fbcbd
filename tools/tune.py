#!/usr/bin/env python
"""`python tools/tune.py ARGS` runs `vitmha tune ARGS` (see `vitmha tune --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["tune", *sys.argv[1:]])
