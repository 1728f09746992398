"""Custom tasks: sentence(-pair) classification or regression from CSV or JSONL files."""

from __future__ import annotations

import csv
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from soralib.errors import InputError
from soralib.train.custom_labels import (TASK_TYPES, check_one_spelling_per_class, check_regression_targets,
                                        class_key, custom_label, infer_task_type, label_value, warn_case_variants)
from soralib.train.tasks import LARGE_TASK_MIN_TRAIN_ROWS, TaskSpec

Rows = list[dict[str, Any]]




class _Record(NamedTuple):
    path: Path
    line: int
    texts: dict[str, str]
    raw: Any  # the label as written: a str (CSV, JSONL) or a number (JSONL)
    value: str | float  # the label as a number, or as stripped text when it is not one


def load_custom(
    train_file: str | os.PathLike,
    validation_file: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    task_type: str | None = None,
) -> tuple[dict[str, Rows], TaskSpec]:
    """Load a custom task from CSV or JSONL files (chosen by extension) into rows and a TaskSpec.

    `task_type` is "classification" or "regression"; None infers it from the training labels: all text ->
    classification; all numbers, one with a fraction (0.5) -> regression; only whole numbers -> classification
    with 2 or 3 distinct values. Otherwise (text among numbers, 4 or more whole numbers) the guess could be
    wrong: an InputError asks for task_type. Classes are the sorted set of training labels (numerically
    sorted when all are numbers). Rejected, naming file, line and column: an empty label, null, a boolean, a
    list or an object; nan or inf; in a classification file, one class written two ways (1, 1.0 and "1").
    Returns ``({"train", "validation"}, spec)``.
    """
    text_columns = tuple(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise InputError(f"text_columns must name 1 or 2 columns, got {len(text_columns)}")
    if len(set(text_columns)) < len(text_columns):
        raise InputError(f"text_columns must name different columns, got {', '.join(text_columns)}")
    if label_column in text_columns:  # the model would read its answer: ~100 % accuracy that means nothing
        raise InputError(f"text_columns ({', '.join(text_columns)}) holds the label column {label_column!r}; the "
                         "model would read the answer: name only text columns (or set label_column)")
    if "label" in text_columns:  # each row keeps its class under "label": the text would be overwritten
        raise InputError("text_columns cannot include a column named 'label' (the harness keeps each row's class "
                         "there); rename that column in the files")
    if task_type is not None and task_type not in TASK_TYPES:
        raise InputError(f"task_type must be one of {', '.join(TASK_TYPES)} (or unset: inferred), got {task_type!r}")
    records = {
        "train": _read_records(Path(train_file), text_columns, label_column),
        "validation": _read_records(Path(validation_file), text_columns, label_column),
    }
    if task_type is None:
        task_type = infer_task_type(Path(train_file), label_column, records["train"])
    regression = task_type == "regression"
    if regression:
        check_regression_targets(records["train"], records["validation"], Path(train_file), label_column)

    label_names: tuple[str, ...] = ()
    if not regression:
        for recs in records.values():
            check_one_spelling_per_class(recs, label_column)
        values = {class_key(r.value): r.value for r in records["train"]}
        if len(values) < 2:
            raise InputError(
                f"{train_file}: column {label_column!r} has a single label value; classification needs at "
                "least 2 (for a regression task set task_type (--task-type) to regression)"
            )
        numeric = all(isinstance(v, float) for v in values.values())
        label_names = tuple(sorted(values, key=(lambda k: values[k]) if numeric else str))
        warn_case_variants(label_names)

    index = {name: i for i, name in enumerate(label_names)}
    splits: dict[str, Rows] = {}
    for split, recs in records.items():
        splits[split] = [{**r.texts, "label": custom_label(r, regression, index)} for r in recs]
    spec = TaskSpec(
        name="custom",
        text_columns=text_columns,
        num_labels=1 if regression else len(label_names),
        label_names=label_names,
        main_metric="pearson" if regression else "accuracy",
        is_large=len(splits["train"]) >= LARGE_TASK_MIN_TRAIN_ROWS,
    )
    return splits, spec


def check_data_file(path: Path) -> str:
    """The suffix (".csv" or ".jsonl") of a data file that exists and is UTF-8 text; InputError otherwise."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise InputError(f"{path}: unsupported file type {suffix or '(none)'!r}; allowed: .csv, .jsonl")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_utf8(path)
    return suffix


def check_utf8(path: Path) -> None:
    """Name the file and line of a byte that is not UTF-8, instead of the codec's anonymous message."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None


@contextmanager
def csv_field_limit(path: Path) -> Iterator[None]:
    """Let a CSV/TSV field be as long as its file while it is read.

    csv's default limit (128 Ki characters) would stop a long text with csv.Error; texts are truncated to
    max_length tokens later anyway. The old limit comes back afterwards (it is process-wide).
    """
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, path.stat().st_size))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _read_records(path: Path, text_columns: tuple[str, ...], label_column: str) -> list[_Record]:
    """One record per data row of a CSV/JSONL file, its label checked (see `label_value`)."""
    suffix = check_data_file(path)
    wanted = (*text_columns, label_column)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".csv":
            with csv_field_limit(path):
                # strict: a stray quote is an error, not rows silently merged into one field up to the next quote
                reader = csv.DictReader(f, strict=True)
                try:
                    header = reader.fieldnames or []
                    _check_csv_header(path, header, wanted)
                    for rec in reader:
                        if None in rec or None in rec.values():
                            raise InputError(f"{path} line {reader.line_num}: wrong number of columns, "
                                             f"expected {len(header)}")
                        texts = {c: rec[c] for c in text_columns}
                        out.append(_record(path, reader.line_num, texts, rec[label_column], label_column))
                except csv.Error as err:
                    raise InputError(f"{path} line {reader.reader.line_num}: not valid CSV ({err}); a field that opens "
                                     'a quote must close it, and a quote inside a quoted field is written ""') from None
        else:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    texts, raw = _parse_jsonl_line(path, line, text, text_columns, label_column)
                    out.append(_record(path, line, texts, raw, label_column))
    if not out:
        raise InputError(f"{path}: no data rows")
    return out


def _check_csv_header(path: Path, header: list[str], wanted: tuple[str, ...]) -> None:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise InputError(f"{path} line 1: header has no column {missing[0]!r}; header: {', '.join(header)}")
    for col in wanted:  # DictReader keeps the last of two same-named columns, silently
        if header.count(col) > 1:
            raise InputError(f"{path} line 1: column {col!r} appears {header.count(col)} times in the header; "
                             "rename or remove all but one")


class _JsonObject(dict):
    """A JSON object that remembers the keys written more than once (json.loads keeps the last, silently)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        keys = [k for k, _ in pairs]
        self.repeated = {k for k in keys if keys.count(k) > 1} if len(self) < len(pairs) else set()


def _parse_jsonl_line(path: Path, line: int, text: str, text_columns: tuple[str, ...], label_column: str):
    try:
        rec = json.loads(text, object_pairs_hook=_JsonObject)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} line {line}: invalid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path} line {line}: expected a JSON object, got {type(rec).__name__}")
    for col in (*text_columns, label_column):
        if col not in rec:
            raise InputError(f"{path} line {line}: missing field {col!r}")
        if col in rec.repeated:
            raise InputError(f"{path} line {line}: field {col!r} appears more than once; remove all but one")
    for col in text_columns:
        if not isinstance(rec[col], str):
            raise InputError(f"{path} line {line}: field {col!r} must be a string")
    return {c: rec[c] for c in text_columns}, rec[label_column]


def _record(path: Path, line: int, texts: dict[str, str], raw: Any, column: str) -> _Record:
    return _Record(path, line, texts, raw, label_value(path, line, raw, column))


