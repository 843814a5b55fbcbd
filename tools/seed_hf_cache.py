#!/usr/bin/env python
"""`python tools/seed_hf_cache.py ARGS` runs `vitmha seed-cache ARGS` (see `vitmha seed-cache --help`)."""
import sys

from vitmha.cli import cli_main

if __name__ == "__main__":
    cli_main(["seed-cache", *sys.argv[1:]])
