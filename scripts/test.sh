#!/usr/bin/env bash
# Run the whole test suite (creates/updates .venv/ first). Extra arguments go to pytest.
source "$(dirname "$0")/venv.sh"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
