"""The rows of docs/errors.md for data files that no other test file covers: a custom file's text columns and
lines, hub rows, and the rows the paper split needs; each rejected with a one-line message."""

import pytest

from rejection_helpers import _write, one_line
from soralib.errors import InputError
from soralib.train import data
from soralib.train.tasks import get_task

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


@pytest.mark.parametrize("columns, expected", [
    ([], "text_columns must name 1 or 2 columns, got 0"),
    (["t", "l", "x"], "text_columns must name 1 or 2 columns, got 3"),
    (["t", "t"], "text_columns must name different columns, got t, t"),
    (["t", "l"], "text_columns (t, l) holds the label column 'l'; the model would read the answer: name only text "
                 "columns (or set label_column)"),
], ids=["none", "three", "twice", "the-label"])
def test_custom_text_columns_must_name_one_or_two_columns(tmp_path, columns, expected):
    train = _write(tmp_path / "train.csv", "t,l,x\na,x,y\nb,y,z\n")
    with pytest.raises(InputError) as excinfo:
        data.load_custom(train, train, columns, "l")
    assert one_line(excinfo) == expected


def test_a_custom_file_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(InputError) as excinfo:
        data.load_custom(tmp_path / "nope.csv", tmp_path / "nope.csv", ["t"], "l")
    assert one_line(excinfo) == f"{tmp_path / 'nope.csv'}: file not found"


@pytest.mark.parametrize("line, expected", [
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"t": 5, "l": "x"}', "line 2: field 't' must be a string"),
], ids=["not-an-object", "text-not-a-string"])
def test_a_custom_jsonl_line_must_be_an_object_with_string_texts(tmp_path, line, expected):
    train = _write(tmp_path / "train.jsonl", '{"t": "a", "l": "x"}\n' + line + "\n")
    with pytest.raises(InputError) as excinfo:
        data.load_custom(train, train, ["t"], "l")
    assert one_line(excinfo) == f"{train} {expected}"


@pytest.mark.parametrize("labels, expected", [
    ([0, 2], "hub rte/train row 1: label 2 outside 0..1"),
    ([], "hub rte/train: no rows"),
], ids=["label-out-of-range", "empty-split"])
def test_hub_rows_with_a_label_outside_the_task_or_no_rows_are_rejected(monkeypatch, labels, expected):
    import datasets

    split = {"sentence1": ["A."] * len(labels), "sentence2": ["B."] * len(labels), "label": labels}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: {"train": split, "validation": split})
    with pytest.raises(InputError) as excinfo:
        data.load_hub("rte")
    assert one_line(excinfo) == expected


@pytest.mark.parametrize("task, n_train, n_dev, expected", [
    ("sst2", 1000, 10, "task 'sst2': the paper split needs more than 1000 training rows, got 1000"),
    ("rte", 10, 1, "task 'rte': the paper split needs at least 2 dev rows"),
], ids=["large-task-too-few-train-rows", "small-task-one-dev-row"])
def test_paper_split_needs_enough_rows(task, n_train, n_dev, expected):
    rows = lambda n: [{"sentence": "x", "label": 0} for _ in range(n)]  # noqa: E731
    with pytest.raises(InputError) as excinfo:
        data.paper_split(get_task(task), rows(n_train), rows(n_dev), seed=0)
    assert one_line(excinfo) == expected
