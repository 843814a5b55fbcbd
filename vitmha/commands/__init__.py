"""The ``vitmha`` subcommands other than fit/validate/test, one module each with ``main(argv)``."""
