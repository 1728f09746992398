#!/usr/bin/env bash
# Run the whole test suite (creates/updates .venv/ first) on two processes: the tests are single-threaded
# (tests/conftest.py), so two workers use both cores of a 2-core machine. Extra arguments go to pytest
# (`-n 0` runs everything in one process, e.g. for `--pdb`).
source "$(dirname "$0")/venv.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider -n 2 "$@"
