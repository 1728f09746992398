"""The labels of a custom task: each read as a number or a class name, the task type inferred from them, and
the ways a file can write one class twice (1, 1.0 and "1"; NFC and NFD; a zero-width space), refused."""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soralib.errors import InputError

if TYPE_CHECKING:
    from .custom import _Record

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression")
# Whole-number labels with more distinct values than this could be class ids or a score (a 1-5 rating):
# inferring either would be a guess, so the user is asked for task_type. 2 and 3 cover binary and NLI tasks.
MAX_INFERRED_CLASSES = 3
DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")  # "2,5": a score written with a decimal comma, not a class
WHOLE_NUMBER = re.compile(r"[-+]?\d+")


def infer_task_type(path: Path, column: str, records: list[_Record]) -> str:
    texts = [r for r in records if isinstance(r.value, str)]
    if len(texts) == len(records):
        if all(DECIMAL_COMMA.fullmatch(r.value) for r in texts):
            raise InputError(f"{path} line {texts[0].line}: label {show_label(texts[0].raw)} in column {column!r} "
                             "looks like a number with a decimal comma, as does every label; write a point (2.5), or "
                             "set task_type (--task-type) to classification")
        return "classification"
    if texts:  # "n/a" among scores: a typo or a missing value as often as a class
        raise InputError(f"{path} line {texts[0].line}: label {show_label(texts[0].raw)} in column {column!r} is text "
                         "among numbers; fix it, or set task_type (--task-type) to classification")
    values = [r.value for r in records]
    if any(not v.is_integer() for v in values):
        return "regression"
    distinct = sorted(set(values))
    if len(distinct) <= MAX_INFERRED_CLASSES:
        return "classification"
    raise InputError(f"{path}: column {column!r} holds only whole numbers, {len(distinct)} distinct "
                     f"({int(distinct[0])} to {int(distinct[-1])}): classes or a score? set task_type "
                     "(--task-type) to classification or regression")


def check_one_spelling_per_class(records: list[_Record], column: str) -> None:
    """1, 1.0 and "1" in one file would silently be one class, NFC and NFD "café" or "pos" and "pos" with a
    zero-width space silently two that look the same: a file writes each class one way."""
    first: dict[str, _Record] = {}
    for r in records:
        seen = first.setdefault(_spelling(r.value), r)
        if show_label(seen.raw) != show_label(r.raw):
            # written as escapes when the two would print alike (NFC and NFD)
            show = ascii if _spelling(show_label(seen.raw)) == _spelling(show_label(r.raw)) else show_label
            raise InputError(f"{r.path} line {r.line}: label {show(r.raw)} in column {column!r} is label "
                             f"{show(seen.raw)} of line {seen.line} written another way; write each class one way")


def _spelling(value: str | float) -> str:
    """What a class looks like: its Unicode compatibility form (NFKC: NFC and NFD alike, "x²" as "x2") without
    invisible format characters (a zero-width space)."""
    if not isinstance(value, str):
        return class_key(value)
    return unicodedata.normalize("NFKC", "".join(ch for ch in value if unicodedata.category(ch) != "Cf")).strip()


def warn_case_variants(names: tuple[str, ...]) -> None:
    """Classes that differ only in case ("Positive", "positive") are kept apart, which a typo also does: say so."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    for group in (g for g in groups.values() if len(g) > 1):
        logger.warning("classes %s differ only in case: they are %d classes (write each class one way if they are "
                       "one)", ", ".join(map(repr, group)), len(group))


def check_regression_targets(train: list[_Record], validation: list[_Record], train_file: Path, column: str) -> None:
    """One target value teaches nothing (as one class does); a validation set of one value scores every model 0."""
    if any(isinstance(r.value, str) for r in train + validation):
        return  # custom_label names the row that is no number
    values = {r.value for r in train}
    if len(values) == 1:
        raise InputError(f"{train_file}: column {column!r} holds a single value ({values.pop():g}); regression needs "
                         "at least 2 different targets")
    values = {r.value for r in validation}
    if len(values) < 2:
        logger.warning("the validation targets are %s: Pearson and Spearman correlations are undefined there and "
                       "count as 0 for every model", f"all {values.pop():g}" if values else "missing")


def label_value(path: Path, line: int, raw: Any, column: str) -> str | float:
    """A label as a finite number, or as stripped text when it is not a number.

    Rejected: an empty label, nan and inf (missing values, never a class or a regression target); null and
    booleans, which would become the classes "None" and "True" (and true == 1 in Python); lists and objects.
    """
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise InputError(f"{path} line {line}: label {show_label(raw)} in column {column!r} is not a string or a number")
    try:
        value = float(raw)
    except OverflowError:  # a JSON integer beyond float range
        value = math.inf
    except ValueError:
        if not raw.strip():
            raise InputError(f"{path} line {line}: label in column {column!r} is empty") from None
        if "\n" in raw.strip() or "\r" in raw.strip():  # no class name spans lines: rows swallowed by a quote
            raise InputError(f"{path} line {line}: label {show_label(raw)[:60]} in column {column!r} spans lines; "
                             "is a quote opened on an earlier line and never closed?") from None
        return raw.strip()
    if not math.isfinite(value):
        raise InputError(f"{path} line {line}: label {show_label(raw)} in column {column!r} is not a finite number")
    text = str(raw).strip()  # a finite float has at most 309 digits: str() of the int is cheap
    if WHOLE_NUMBER.fullmatch(text) and int(text) != value:  # beyond 2**53, neighbouring ids would become one class
        raise InputError(f"{path} line {line}: label {show_label(raw)} in column {column!r} is a whole number a float "
                         "cannot hold exactly (beyond 2**53); give the classes names or ids of at most 2**53")
    return value


def custom_label(r: _Record, regression: bool, index: dict[str, int]) -> int | float:
    if regression:
        if isinstance(r.value, str):
            raise InputError(f"{r.path} line {r.line}: label {r.raw!r} is not a number; "
                             "regression labels must be numbers")
        return r.value
    key = class_key(r.value)
    if key not in index:
        twin = next((name for name in index if _spelling(name) == _spelling(r.value)), None)
        if twin is not None:  # NFC in one file, NFD in the other: they print alike
            raise InputError(f"{r.path} line {r.line}: label {ascii(key)} is the training file's class {ascii(twin)} "
                             "written another way; write each class one way")
        raise InputError(f"{r.path} line {r.line}: label {key!r} does not occur in the training file; "
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


def class_key(value: str | float) -> str:
    """A class name: the text, or the number written shortest (1.0 -> "1")."""
    if isinstance(value, str):
        return value
    return str(int(value)) if value.is_integer() else repr(value)


def show_label(raw: Any) -> str:
    """A label as the file wrote it: '1' for text, 1 or 1.0 for a JSON number, null, true."""
    return repr(raw.strip()) if isinstance(raw, str) else json.dumps(raw)
