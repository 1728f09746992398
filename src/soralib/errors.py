"""Exceptions shared across soralib."""


class InputError(ValueError):
    """Bad user input; the CLI prints its one-line message and exits 2."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the CLI prints the one-line message and exits 1."""
