#!/usr/bin/env python
"""`python tools/predict.py ARGS` runs `vitmha predict ARGS` (see `vitmha predict --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["predict", *sys.argv[1:]])
