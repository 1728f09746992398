"""What every benchmark shares: paths, the machine and commit record, JSONL results, the targets."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
RUNS = BENCH / "runs"
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"  # the project's shared GLUE copy, when present

# Paper / issue targets, printed next to each measured ratio; never asserted.
# key -> (text, test of the value)
TARGETS: dict[str, tuple[str, Any]] = {
    "sora_over_lora_step": ("≤ 1.03", lambda v: v <= 1.03),
    "sora_over_adalora_step": ("≤ 0.95", lambda v: v <= 0.95),
    "sora_over_lora_memory": ("≤ 1.03", lambda v: v <= 1.03),
    "merged_over_base_latency": ("1.00 ± 0.02", lambda v: abs(v - 1.0) <= 0.02),
    "matmul_peak_fraction": ("≥ 0.45", lambda v: v >= 0.45),
    "padded_over_ours_epoch": ("≥ 1.6", lambda v: v >= 1.6),
}


STATUS = {True: "met", False: "missed", None: "not yet measured"}  # target_met's answers, as tables print them


def target_met(key: str, value: float | None) -> bool | None:
    """True/False against the target of `key`; None when there is no target or no value."""
    if key not in TARGETS or value is None:
        return None
    return bool(TARGETS[key][1](value))


def _git(*args: str) -> str | None:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not even refresh the index (read-only benchmarks).
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the repository, or None outside a checkout."""
    return _git("rev-parse", "HEAD")


def git_dirty() -> bool | None:
    """True when tracked files differ from HEAD: the numbers are then not exactly the commit's."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def machine() -> dict[str, Any]:
    """Where a number was measured: cores, threads, library versions, platform."""
    import peft
    import torch
    import transformers

    return {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def provenance(module: str, argv: Iterable[str]) -> dict[str, Any]:
    """The exact command (in its `python -m` form, which `sora bench` runs too), commit and machine."""
    return {"command": shlex.join(["python", "-m", module, *argv]), "commit": git_commit(), "dirty": git_dirty(),
            "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file; unreadable lines (a torn write, a stray edit) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add one line, rewriting the file atomically: a crash leaves the old file or the new one, never half."""
    from soralib.io import atomic_write_text

    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(record, sort_keys=True) + "\n")


def done_keys(path: str | os.PathLike) -> set[str]:
    """Keys of the finished cells recorded in `path`."""
    return {r["key"] for r in read_jsonl(path) if "key" in r}


def median(values: Iterable[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def quiet_libraries() -> None:
    """Silence transformers' load-time warnings (e.g. a freshly initialised head): they are expected here."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices between transformers and peft
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def python_env() -> dict[str, str]:
    """Environment for a child `python -m bench...`: the repository root on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
