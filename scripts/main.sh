#!/usr/bin/env bash
# The main job (creates/updates .venv/ first): the end-to-end quickstart on a tiny model.
source "$(dirname "$0")/venv.sh"
cd "$ROOT"
exec "$PY" examples/quickstart.py "$@"
