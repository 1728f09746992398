"""The per-module ranks of SoRA cells, for the controls that train plain LoRA with them (issue 13).

    lora-pattern     plain PEFT LoRA from scratch with the ranks the matching sora-budget cell kept
    random-pattern   the same multiset of ranks, assigned to the modules at random (seeded): where they go

The ranks come from the public CLI, `sora ranks RUN_DIR` (a complete LoraConfig JSON), stored per cell in
bench/results/ranks.jsonl so that they outlive the run directories; `sora train --lora-config FILE` trains
them. The source of a cell is the sora-budget cell of the same task and seed at sora-budget's own lr.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from soralib.train.rundir import SORA_ADAPTER

from . import common

STORE = common.RESULTS / "ranks.jsonl"
SOURCE = "sora-budget"
SHUFFLED = {"lora-pattern": False, "random-pattern": True}  # the variants built on a source's ranks


def load(path: str | Path = STORE) -> dict[str, dict[str, Any]]:
    """{sora cell key: its LoraConfig fields}."""
    return {r["key"]: r["lora_config"] for r in common.read_jsonl(path) if "lora_config" in r}


def capture(key: str, run_dir: Path, path: str | Path = STORE) -> bool:
    """Store `sora ranks run_dir` under `key`; False when the run has no gated adapter or the call fails."""
    if not (run_dir / SORA_ADAPTER).is_dir():
        return False
    done = subprocess.run([sys.executable, "-m", "soralib.cli", "ranks", str(run_dir)], cwd=common.REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAIL  sora ranks {run_dir}: {(done.stderr.strip().splitlines() or ['no message'])[-1]}", flush=True)
        return False
    common.append_jsonl(path, {"kind": "ranks", "key": key, "lora_config": json.loads(done.stdout)})
    return True


def backfill(records: dict[str, dict], runs_dir: Path, path: str | Path = STORE) -> None:
    """Capture the ranks of every finished sora cell whose run directory is at hand and has none stored."""
    have = load(path)
    for key, r in records.items():
        if r.get("variant") == SOURCE and key not in have:
            capture(key, runs_dir / key, path)


def write(variant: str, task: str, seed: int, source: dict[str, Any], out: Path) -> None:
    """The LoraConfig JSON a pattern cell trains with: the source's ranks, shuffled over its modules for
    random-pattern (seeded by task and seed, so tasks draw independent shuffles; each module's alpha travels
    with its rank, so every rank keeps its scale)."""
    fields = dict(source)
    if SHUFFLED[variant]:
        modules = sorted(fields["rank_pattern"])
        pairs = [(fields["rank_pattern"][m], fields.get("alpha_pattern", {}).get(m)) for m in modules]
        random.Random(f"{task}-{seed}").shuffle(pairs)
        fields["rank_pattern"] = {m: rank for m, (rank, _) in zip(modules, pairs)}
        if "alpha_pattern" in fields:
            fields["alpha_pattern"] = {m: alpha for m, (_, alpha) in zip(modules, pairs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
