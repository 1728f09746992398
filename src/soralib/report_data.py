"""Read a run directory's files for the report: metrics.json, sparsity.json, history.jsonl and stages.jsonl.

Everything is read with the json module. A missing file reads as empty; a broken JSON file, or a field the
report computes with that has the wrong type, is a one-line InputError before anything is drawn; a torn line of
a JSON-lines log (a run killed mid-write) is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .errors import InputError
from .train.rundir import CONFIG, HISTORY, METRICS, SPARSITY, STAGES, written_by_sora

# The warnings are `sora report`'s, under the logger name they had before this module was split off.
log = logging.getLogger("soralib.report")


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics, sparsity, history, stages) of `run_dir`, checked; InputError if it is not a run directory."""
    if not run_dir.is_dir():
        reason = "not a directory" if run_dir.exists() else "does not exist"
        raise InputError(f"not a soralib run directory: {run_dir} ({reason})")
    # an interrupted run has no metrics.json yet, but its config.yaml says it is one: its curves are worth a report
    if not ((run_dir / METRICS).is_file() or (run_dir / STAGES).is_file() or written_by_sora(run_dir / CONFIG)):
        raise InputError(f"not a soralib run directory: {run_dir} (no metrics.json, stages.jsonl or config.yaml "
                         "written by sora train)")
    metrics = _read_json(run_dir / METRICS) or {}
    sparsity = _read_json(run_dir / SPARSITY) or {}
    history = [row for row in read_jsonl(run_dir / HISTORY) if is_number(row.get("step"))]
    stages = read_jsonl(run_dir / STAGES)
    _check_structure(run_dir, sparsity, stages)
    return metrics, sparsity, history, stages


def _check_structure(run_dir: Path, sparsity: dict[str, Any], stages: list[dict[str, Any]]) -> None:
    """Refuse files of the right syntax but the wrong shape, before any plot is drawn."""
    modules = sparsity.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "module" in m for m in modules):
        raise InputError(f"{run_dir / 'sparsity.json'}: 'modules' must be a list of objects with a 'module' key")
    for number, module in enumerate(modules):
        _check_fields(f"{run_dir / 'sparsity.json'}: modules[{number}] ({module['module']!r})", module, _MODULE_FIELDS)
    for stage in stages:
        for key in ("generalization", "memorization"):
            if not isinstance(stage.get(key, {}), dict):
                raise InputError(f"{run_dir / 'stages.jsonl'}: stage {stage.get('stage')!r} has a non-object {key!r}")
        _check_fields(f"{run_dir / 'stages.jsonl'}: stage {stage.get('stage')!r}", stage, _STAGE_FIELDS)


# The fields the report computes with (as prune.sparsity_report and train/run.py write them): (test, expected)
_NUMBER = (lambda v: is_number(v), "a finite number")
_MODULE_FIELDS = {"module": (lambda v: isinstance(v, str), "a string"),
                  **dict.fromkeys(("r_max", "kept_rank", "in_features", "out_features", "kept_params"), _NUMBER)}
_STAGE_FIELDS = {"main_metric": (lambda v: v is None or isinstance(v, str), "a string or null"),
                 **dict.fromkeys(("stage", "threshold", "kept_params", "kept_rank", "kept_fraction"), _NUMBER)}


def _check_fields(where: str, record: dict[str, Any], fields: dict[str, tuple]) -> None:
    """Each field of `record` that is present has its type: else a plot or a sum fails on it with a traceback."""
    for key, (test, expected) in fields.items():
        if key in record and not test(record[key]):
            value = record[key]
            raise InputError(f"{where}: field {key!r} is {value!r} ({type(value).__name__}); expected {expected}")


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None if the file is missing; a broken file is a one-line InputError."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file ([] if missing). Bad lines are skipped with a warning, not fatal:
    a run killed mid-write leaves a torn last line, and the rest of its log is still worth plotting."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a line that is not valid JSON", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def is_number(value: Any) -> bool:
    # bool is an int subclass, and NaN/inf (which json accepts) cannot be plotted or compared sensibly.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def module_records(sparsity: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-module records of sparsity.json that name a module and a kept rank."""
    return [m for m in sparsity.get("modules") or []
            if isinstance(m, dict) and isinstance(m.get("module"), str) and is_number(m.get("kept_rank"))]
