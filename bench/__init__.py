"""Benchmarks of soralib: speed (`bench.speed`), quality (`bench.quality`) and the tables (`bench.tables`).

Not part of the installed package: run from the repository root as ``python -m bench.speed`` etc., or
as ``sora bench speed ...`` from an editable install (see bench/README.md).
"""
