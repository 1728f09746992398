"""GLUE tasks as rows: read from the standard GLUE TSV layout, or from the Hugging Face hub.

Rows are plain dicts holding a task's text columns and ``label`` (a class index into
``TaskSpec.label_names``, or a float for regression). Loaders return ``{split name: rows}`` with the
splits ``"train"`` and ``TaskSpec.eval_splits`` (``"validation"``, or MNLI's matched/mismatched pair).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soralib.errors import InputError
from soralib.train.custom import Rows, check_utf8, csv_field_limit
from soralib.train.custom_labels import as_float
from soralib.train.tasks import TaskSpec, get_task


@dataclass(frozen=True)
class _TsvFormat:
    """Where a GLUE task's TSV files are and which columns hold its text and label.

    ``columns`` maps text column -> header name, or -> column index when ``n_columns`` is set (no header).
    ``label_map`` maps raw label strings to class indices; None means a float score from 0 to 5.
    """

    directory: str
    columns: dict[str, str | int]
    label: str | int
    label_map: dict[str, int] | None
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv"))
    n_columns: int | None = None


_BINARY = {"0": 0, "1": 1}
_TWO_WAY_NLI = {"entailment": 0, "not_entailment": 1}

GLUE_TSV: dict[str, _TsvFormat] = {
    "rte": _TsvFormat("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _TWO_WAY_NLI),
    "mrpc": _TsvFormat("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality", _BINARY),
    "cola": _TsvFormat("CoLA", {"sentence": 3}, 1, _BINARY, n_columns=4),
    "stsb": _TsvFormat("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", None),
    "sst2": _TsvFormat("SST-2", {"sentence": "sentence"}, "label", _BINARY),
    "qnli": _TsvFormat("QNLI", {"question": "question", "sentence": "sentence"}, "label", _TWO_WAY_NLI),
    "qqp": _TsvFormat("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate", _BINARY),
    "mnli": _TsvFormat(
        "MNLI",
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        {"entailment": 0, "neutral": 1, "contradiction": 2},
        files=(
            ("train", "train.tsv"),
            ("validation_matched", "dev_matched.tsv"),
            ("validation_mismatched", "dev_mismatched.tsv"),
        ),
    ),
}


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def load_glue_dir(task: str | TaskSpec, data_dir: str | os.PathLike) -> dict[str, Rows]:
    """Read a task from the standard GLUE layout ``<data_dir>/<TASK_DIR>/{train,dev}.tsv``."""
    spec = _spec(task)
    fmt = GLUE_TSV[spec.name]
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"GLUE data directory not found: {data_dir}")
    task_dir = data_dir / fmt.directory
    expected = ", ".join(name for _, name in fmt.files)
    if not task_dir.is_dir():
        raise InputError(f"{task_dir}: directory not found; expected {fmt.directory}/ holding {expected}")
    return {split: _read_glue_tsv(task_dir / name, fmt) for split, name in fmt.files}


def _read_glue_tsv(path: Path, fmt: _TsvFormat) -> Rows:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    check_utf8(path)
    rows: Rows = []
    with open(path, encoding="utf-8-sig", newline="") as f, csv_field_limit(path):
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if fmt.n_columns is None:
            header = next(reader, None) or []
            n_columns = len(header)
            columns = {col: _header_index(path, header, name) for col, name in fmt.columns.items()}
            label_index = _header_index(path, header, fmt.label)
        else:
            n_columns, columns, label_index = fmt.n_columns, fmt.columns, fmt.label
        for cells in reader:
            if not cells:  # blank line
                continue
            line = reader.line_num
            if len(cells) != n_columns:
                raise InputError(f"{path} line {line}: {len(cells)} tab-separated columns, expected {n_columns}")
            row: dict[str, Any] = {col: cells[i] for col, i in columns.items()}
            row["label"] = _parse_glue_label(path, line, cells[label_index].strip(), fmt.label_map)
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no data rows")
    return rows


def _header_index(path: Path, header: list[str], name: str | int) -> int:
    if name not in header:
        raise InputError(f"{path} line 1: header has no column {name!r}; header: {', '.join(header)}")
    return header.index(name)


def _parse_glue_label(path: Path, line: int, raw: str, label_map: dict[str, int] | None) -> int | float:
    if label_map is None:
        value = as_float(raw)
        if value is None or not 0.0 <= value <= 5.0:
            raise InputError(f"{path} line {line}: score {raw!r} not allowed; allowed: a number from 0 to 5")
        return value
    if raw not in label_map:
        raise InputError(f"{path} line {line}: label {raw!r} not allowed; allowed: {', '.join(label_map)}")
    return label_map[raw]


def load_hub(task: str | TaskSpec) -> dict[str, Rows]:
    """Load a task with ``datasets.load_dataset("nyu-mll/glue", task)`` into the same rows as `load_glue_dir`."""
    import datasets  # lazy: slow import, only needed here

    spec = _spec(task)
    try:
        dataset = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as exc:  # network, cache or hub errors: report them on one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"could not load GLUE task {spec.name!r} from the Hugging Face Hub ({reason}); "
            "pass a local GLUE data directory instead"
        ) from exc
    return {split: _hub_rows(spec, dataset[split], split) for split in ("train", *spec.eval_splits)}


def _hub_rows(spec: TaskSpec, split_data: Any, split: str) -> Rows:
    columns = {col: list(split_data[col]) for col in (*spec.text_columns, "label")}
    rows: Rows = []
    for i, values in enumerate(zip(*columns.values())):
        row = dict(zip(columns, values))
        if spec.is_regression:
            row["label"] = float(row["label"])
        elif not 0 <= int(row["label"]) < spec.num_labels:
            raise InputError(f"hub {spec.name}/{split} row {i}: label {row['label']} outside 0..{spec.num_labels - 1}")
        else:
            row["label"] = int(row["label"])
        rows.append(row)
    if not rows:
        raise InputError(f"hub {spec.name}/{split}: no rows")
    return rows
