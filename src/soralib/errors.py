"""Exceptions shared across soralib."""


class InputError(ValueError):
    """Bad user input; the CLI prints its one-line message and exits 2."""
