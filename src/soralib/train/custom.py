"""Custom tasks: sentence(-pair) classification or regression from CSV or JSONL files."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from soralib.errors import InputError
from soralib.train.tasks import LARGE_TASK_MIN_TRAIN_ROWS, TaskSpec

Rows = list[dict[str, Any]]


def load_custom(
    train_file: str | os.PathLike,
    validation_file: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    regression: bool | None = None,
) -> tuple[dict[str, Rows], TaskSpec]:
    """Load a custom task from CSV or JSONL files (chosen by extension) into rows and a TaskSpec.

    Regression when `regression` is True, or when it is None and every training label is a number
    and not all of them are integers; classification otherwise, with classes = the sorted set of
    training labels (numerically sorted when all are integers). Returns ``({"train", "validation"}, spec)``.
    """
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise InputError(f"text_columns must name 1 or 2 columns, got {len(text_columns)}")
    records = {
        "train": _read_records(Path(train_file), text_columns, label_column),
        "validation": _read_records(Path(validation_file), text_columns, label_column),
    }
    if regression is None:
        values = [as_float(raw) for _, _, _, raw in records["train"]]
        regression = all(v is not None for v in values) and not all(v.is_integer() for v in values)

    label_names: tuple[str, ...] = ()
    if not regression:
        keys = {_label_key(raw) for _, _, _, raw in records["train"]}
        if len(keys) < 2:
            raise InputError(
                f"{train_file}: column {label_column!r} has a single label value; classification needs at "
                "least 2 (for a regression task pass regression=True)"
            )
        numeric = all(_is_int_string(k) for k in keys)
        label_names = tuple(sorted(keys, key=int if numeric else str))

    index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, Rows] = {}
    for split, recs in records.items():
        splits[split] = [
            {**texts, "label": _custom_label(path, line, raw, regression, index)} for path, line, texts, raw in recs
        ]
    spec = TaskSpec(
        name="custom",
        text_columns=text_columns,
        num_labels=1 if regression else len(label_names),
        label_names=label_names,
        main_metric="pearson" if regression else "accuracy",
        is_large=len(splits["train"]) >= LARGE_TASK_MIN_TRAIN_ROWS,
    )
    return splits, spec


def check_utf8(path: Path) -> None:
    """Name the file and line of a byte that is not UTF-8, instead of the codec's anonymous message."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None


def _read_records(path: Path, text_columns: tuple[str, ...], label_column: str) -> list[tuple]:
    """Return ``(path, line, {text column: text}, raw label)`` for each data row of a CSV/JSONL file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r}; allowed: .csv, .jsonl")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_utf8(path)
    wanted = (*text_columns, label_column)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            missing = [c for c in wanted if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path} line 1: header has no column {missing[0]!r}; header: "
                                 f"{', '.join(reader.fieldnames or [])}")
            for rec in reader:
                if None in rec or None in rec.values():
                    raise InputError(f"{path} line {reader.line_num}: wrong number of columns, "
                                     f"expected {len(reader.fieldnames)}")
                out.append((path, reader.line_num, {c: rec[c] for c in text_columns}, rec[label_column]))
        else:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    out.append((path, line, *_parse_jsonl_line(path, line, text, text_columns, label_column)))
    if not out:
        raise InputError(f"{path}: no data rows")
    return out


def _parse_jsonl_line(path: Path, line: int, text: str, text_columns: tuple[str, ...], label_column: str):
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} line {line}: invalid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path} line {line}: expected a JSON object, got {type(rec).__name__}")
    for col in (*text_columns, label_column):
        if col not in rec:
            raise InputError(f"{path} line {line}: missing field {col!r}")
    for col in text_columns:
        if not isinstance(rec[col], str):
            raise InputError(f"{path} line {line}: field {col!r} must be a string")
    return {c: rec[c] for c in text_columns}, rec[label_column]


def _custom_label(path: Path, line: int, raw: Any, regression: bool, index: dict[str, int]) -> int | float:
    if regression:
        value = as_float(raw)
        if value is None:
            raise InputError(f"{path} line {line}: label {raw!r} is not a number; regression labels must be numbers")
        return value
    key = _label_key(raw)
    if key not in index:
        raise InputError(f"{path} line {line}: label {key!r} does not occur in the training file; "
                         f"allowed: {', '.join(index)}")
    return index[key]


def as_float(raw: Any) -> float | None:
    """A finite float from a number or numeric string; None otherwise (bools are not numbers)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _label_key(raw: Any) -> str:
    """Class labels as strings: 1, 1.0 and "1" are the same class."""
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def _is_int_string(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
