"""Exceptions shared across soralib."""

import errno


class InputError(ValueError):
    """Bad user input; the CLI prints its one-line message and exits 2."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the CLI prints the one-line message and exits 1."""


class DiskFull(OSError):
    """A write failed for lack of space; the CLI prints 'no space left on device at PATH' and exits 1."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, "No space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device at {self.filename}"
