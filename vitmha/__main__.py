"""``python -m vitmha ...`` is the ``vitmha`` command."""
from vitmha.cli import cli_main

cli_main()
