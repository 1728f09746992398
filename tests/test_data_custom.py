"""Data layer, custom CSV/JSONL files: labels (classes or scores, and how they are told apart), every malformed
file named with its line, very long fields, and --task-type reaching the loader."""

from __future__ import annotations

import json

import pytest

from data_helpers import write, write_rte
from soralib.errors import InputError
from soralib.train.data import load_custom, load_glue_dir


def test_custom_csv_string_labels_map_to_sorted_train_labels(tmp_path):
    write(tmp_path / "train.csv", ["text,label", '"Great, really",pos', "Bad,neg", "Fine,neutral"])
    write(tmp_path / "dev.csv", ["text,label", "Meh,neg"])
    splits, spec = load_custom(tmp_path / "train.csv", tmp_path / "dev.csv", ["text"], "label")
    assert spec.name == "custom" and spec.label_names == ("neg", "neutral", "pos") and spec.num_labels == 3
    assert splits["train"][0] == {"text": "Great, really", "label": 2}
    assert splits["validation"] == [{"text": "Meh", "label": 0}]
    assert spec.main_metric == "accuracy" and not spec.is_large


def test_custom_integer_labels_sort_numerically_and_match_across_types(tmp_path):
    write(tmp_path / "train.jsonl", [json.dumps({"a": "x", "b": "y", "y": y}) for y in (10, 2, 1)])
    write(tmp_path / "dev.jsonl", ['{"a": "x", "b": "y", "y": "2"}', "", '{"a": "x", "b": "y", "y": 10.0}'])
    splits, spec = load_custom(tmp_path / "train.jsonl", tmp_path / "dev.jsonl", ("a", "b"), "y")
    assert spec.label_names == ("1", "2", "10") and spec.text_columns == ("a", "b")
    assert [r["label"] for r in splits["validation"]] == [1, 2]


def test_custom_non_integer_float_labels_are_regression(tmp_path):
    write(tmp_path / "train.jsonl", ['{"t": "a", "s": 0.5}', '{"t": "b", "s": 2}'])
    write(tmp_path / "dev.csv", ["t,s", "c,1.25"])
    splits, spec = load_custom(tmp_path / "train.jsonl", tmp_path / "dev.csv", ["t"], "s")
    assert spec.num_labels == 1 and spec.is_regression and spec.label_names == ()
    assert [r["label"] for r in splits["train"]] == [0.5, 2.0] and splits["validation"][0]["label"] == 1.25


def test_custom_integer_valued_labels_are_classes_unless_regression_is_requested(tmp_path):
    write(tmp_path / "train.csv", ["t,s", "a,0", "b,1", "c,5"])
    _, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s")
    assert spec.num_labels == 3
    splits, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="regression")
    assert spec.num_labels == 1 and [r["label"] for r in splits["train"]] == [0.0, 1.0, 5.0]


def test_custom_validation_label_unseen_in_train_is_rejected(tmp_path):
    write(tmp_path / "train.csv", ["t,l", "a,x", "b,y"])
    write(tmp_path / "dev.csv", ["t,l", "a,x", "b,z"])
    message = r"dev\.csv line 3: label 'z' does not occur in the training file; allowed: x, y"
    with pytest.raises(InputError, match=message):
        load_custom(tmp_path / "train.csv", tmp_path / "dev.csv", ["t"], "l")


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        ("train.tsv", ["t\tl"], r"unsupported file type '\.tsv'; allowed: \.csv, \.jsonl"),
        ("train.csv", ["text,l", "a,x"], r"train\.csv line 1: header has no column 't'"),
        ("train.csv", ["t,l", "a,x", "b,y,extra"], r"train\.csv line 3: wrong number of columns, expected 2"),
        ("train.jsonl", ['{"t": "a", "l": 1}', "{oops"], r"train\.jsonl line 2: invalid JSON"),
        ("train.jsonl", ['{"t": "a"}'], r"train\.jsonl line 1: missing field 'l'"),
        ("train.jsonl", ['{"t": "a", "l": 1}', '{"t": "b", "l": 1}'], r"single label value"),
        ("train.csv", ["t,l"], r"train\.csv: no data rows"),
        # a stray quote merged the rows after it into one field (and made a new class of the rest)
        ("train.csv", ["t,l", '"great movie,x', "bad film,y", '"quoted" ok,x', "fine,y"],
         r"train\.csv line 4: not valid CSV \(',' expected after '\"'\)"),
        ("train.csv", ["t,l", 'great movie,"x', "bad film,y", '"', "fine,y"],
         r"train\.csv line 4: label 'x\\nbad film,y' in column 'l' spans lines; is a quote opened"),
    ],
)
def test_bad_custom_files_are_rejected_with_file_and_line(tmp_path, name, lines, message):
    write(tmp_path / name, lines)
    write(tmp_path / "dev.csv", ["t,l", "a,x"])
    with pytest.raises(InputError, match=message):
        load_custom(tmp_path / name, tmp_path / "dev.csv", ["t"], "l")


def test_custom_regression_flag_rejects_non_numeric_label(tmp_path):
    write(tmp_path / "train.csv", ["t,l", "a,1.5", "b,high"])
    with pytest.raises(InputError, match=r"train\.csv line 3: label 'high' is not a number"):
        load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "l", task_type="regression")


def one_line_error(call) -> str:
    with pytest.raises(InputError) as excinfo:
        call()
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(("name", "lines", "expected"), [
    ("train.csv", ["t,s", "a,0.5", "b,nan", "c,2.25"], "train.csv line 3: label 'nan' in column 's' is not a finite number"),
    ("train.jsonl", ['{"t": "a", "s": 0.5}', '{"t": "b", "s": NaN}'], "train.jsonl line 2: label NaN in column 's' is not a finite number"),
    ("train.jsonl", ['{"t": "a", "s": 0.5}', '{"t": "b", "s": "-inf"}'], "train.jsonl line 2: label '-inf' in column 's' is not a finite number"),
    ("train.jsonl", ['{"t": "a", "s": 0.5}', '{"t": "b", "s": 1' + "0" * 400 + "}"], "train.jsonl line 2: label 1000"),
], ids=["csv-nan", "jsonl-NaN", "jsonl-string-inf", "jsonl-huge-integer"])
def test_custom_non_finite_label_is_rejected_naming_line_and_column(tmp_path, name, lines, expected):
    # One nan among float scores used to make the task a classification with one class per distinct score.
    write(tmp_path / name, lines)
    message = one_line_error(lambda: load_custom(tmp_path / name, tmp_path / name, ["t"], "s"))
    assert message.startswith(f"{tmp_path}/{expected}")


def test_custom_many_whole_number_labels_ask_for_task_type_and_either_type_can_be_chosen(tmp_path):
    write(tmp_path / "train.csv", ["t,s", *(f"x{i},{i % 6}" for i in range(12))])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s"))
    assert message == (f"{tmp_path}/train.csv: column 's' holds only whole numbers, 6 distinct (0 to 5): classes or "
                       "a score? set task_type (--task-type) to classification or regression")
    splits, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="regression")
    assert spec.is_regression and splits["train"][5]["label"] == 5.0
    _, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="classification")
    assert spec.label_names == ("0", "1", "2", "3", "4", "5")


def test_custom_explicit_classification_takes_fractional_classes_in_numeric_order(tmp_path):
    write(tmp_path / "train.csv", ["t,s", "a,2.5", "b,0.5", "c,10"])
    splits, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="classification")
    assert spec.label_names == ("0.5", "2.5", "10") and [r["label"] for r in splits["train"]] == [1, 0, 2]
    with pytest.raises(InputError, match=r"task_type must be one of classification, regression"):
        load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="ordinal")


def test_custom_text_label_among_numbers_asks_for_task_type(tmp_path):
    write(tmp_path / "train.csv", ["t,s", "a,0.5", "b,1.25", "c,n/a", "d,3"])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s"))
    assert message == (f"{tmp_path}/train.csv line 4: label 'n/a' in column 's' is text among numbers; fix it, or "
                       "set task_type (--task-type) to classification")
    _, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="classification")
    assert spec.label_names == ("0.5", "1.25", "3", "n/a")


@pytest.mark.parametrize(("label", "shown", "problem"), [
    ("null", "null", "is not a string or a number"),
    ("true", "true", "is not a string or a number"),
    ("[1]", "[1]", "is not a string or a number"),
    ('{"a": 1}', '{"a": 1}', "is not a string or a number"),
    ('" "', "", "is empty"),
], ids=["null", "true", "list", "object", "blank"])
def test_custom_label_that_is_no_class_name_is_rejected(tmp_path, label, shown, problem):
    write(tmp_path / "train.jsonl", ['{"t": "a", "l": "x"}', '{"t": "b", "l": ' + label + "}"])
    message = one_line_error(lambda: load_custom(tmp_path / "train.jsonl", tmp_path / "train.jsonl", ["t"], "l"))
    assert message == f"{tmp_path}/train.jsonl line 2: label {shown + ' ' if shown else ''}in column 'l' {problem}"


def test_custom_empty_csv_label_is_rejected(tmp_path):
    write(tmp_path / "train.csv", ["t,s", "a,0.5", "b,", "c,1.5"])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s"))
    assert message == f"{tmp_path}/train.csv line 3: label in column 's' is empty"


@pytest.mark.parametrize(("name", "labels", "expected"), [
    ("train.jsonl", ["1", '"1"', "0"], "train.jsonl line 2: label '1' in column 'l' is label 1 of line 1"),
    ("train.jsonl", ["0", "1", "1.0"], "train.jsonl line 3: label 1.0 in column 'l' is label 1 of line 2"),
    ("train.csv", ["1", "0", "1.0"], "train.csv line 4: label '1.0' in column 'l' is label '1' of line 2"),
    # they look the same, and would be two classes: NFC and NFD, a zero-width space
    ("train.jsonl", ['"caf\\u00e9"', '"cafe\\u0301"', '"the"'], "train.jsonl line 2: label 'cafe\\u0301' in column "
                                                                    "'l' is label 'caf\\xe9' of line 1"),
    ("train.jsonl", ['"pos"', '"neg"', '"pos\\u200b"'], "train.jsonl line 3: label 'pos\\u200b' in column 'l' is "
                                                         "label 'pos' of line 1"),
], ids=["jsonl-number-and-string", "jsonl-int-and-float", "csv-1-and-1.0", "nfc-and-nfd", "zero-width-space"])
def test_custom_class_written_two_ways_in_one_file_is_rejected(tmp_path, name, labels, expected):
    if name.endswith(".csv"):
        write(tmp_path / name, ["t,l", *(f"x,{y}" for y in labels)])
    else:
        write(tmp_path / name, ['{"t": "x", "l": ' + y + "}" for y in labels])
    message = one_line_error(lambda: load_custom(tmp_path / name, tmp_path / name, ["t"], "l"))
    assert message == f"{tmp_path}/{expected} written another way; write each class one way"


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv"])
def test_class_ids_beyond_float_precision_are_refused_not_merged(tmp_path, name):
    # 2**53 + 1 read as a float is 2**53: two ids would silently become one class.
    ids = [2**53, 2**53 + 1, 2**60]
    if name.endswith(".csv"):
        write(tmp_path / name, ["t,l", *(f"x,{y}" for y in ids)])
    else:
        write(tmp_path / name, ['{"t": "x", "l": ' + str(y) + "}" for y in ids])
    message = one_line_error(lambda: load_custom(tmp_path / name, tmp_path / name, ["t"], "l"))
    shown = "9007199254740993" if name.endswith(".jsonl") else "'9007199254740993'"
    assert message == (f"{tmp_path}/{name} line {3 if name.endswith('.csv') else 2}: label {shown} in column 'l' is a "
                       "whole number a float cannot hold exactly (beyond 2**53); give the classes names or ids of at "
                       "most 2**53")


@pytest.mark.parametrize(("name", "lines", "expected"), [
    ("train.csv", ["t,l,t", "a,x,b", "c,y,d"], "train.csv line 1: column 't' appears 2 times in the header; "
                                               "rename or remove all but one"),
    ("train.jsonl", ['{"t": "a", "l": "x"}', '{"t": "b", "l": "x", "l": "y"}'],
     "train.jsonl line 2: field 'l' appears more than once; remove all but one"),
], ids=["csv-column", "jsonl-field"])
def test_custom_column_or_field_given_twice_is_rejected(tmp_path, name, lines, expected):
    write(tmp_path / name, lines)
    message = one_line_error(lambda: load_custom(tmp_path / name, tmp_path / name, ["t"], "l"))
    assert message == f"{tmp_path}/{expected}"


def test_a_text_field_longer_than_the_csv_module_limit_is_read(tmp_path):
    import csv

    long_text = "word " * 200_000  # 1 MB: csv's default field limit is 128 Ki characters
    write(tmp_path / "train.csv", ["t,l", f"{long_text},x", "short,y"])
    splits, _ = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "l")
    assert splits["train"][0]["t"] == long_text
    write_rte(tmp_path, [f"0\t{long_text}\tb\tentailment"], ["0\ta\tb\tentailment"])
    assert load_glue_dir("rte", tmp_path)["train"][0]["sentence1"] == long_text
    assert csv.field_size_limit() == 131072  # the process-wide limit is back


def test_task_type_flag_reaches_the_custom_loader(tmp_path):
    from soralib.train.config import build_config
    from soralib.train.run import load_splits

    write(tmp_path / "train.csv", ["t,s", *(f"x{i},{i % 6}" for i in range(12))])
    files = {"task": "custom", "train_file": str(tmp_path / "train.csv"), "validation_file": str(tmp_path / "train.csv"),
             "text_columns": "t", "label_column": "s"}
    spec, _ = load_splits(build_config("lora", None, {**files, "task_type": "regression"}))
    assert spec.is_regression and spec.main_metric == "pearson"


def test_classes_that_differ_only_in_case_are_kept_apart_with_a_warning(tmp_path, caplog):
    write(tmp_path / "train.csv", ["t,l", "a,positive", "b,negative", "c,Positive", "d,negative"])
    _, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "l")
    assert spec.label_names == ("Positive", "negative", "positive")
    assert "classes 'Positive', 'positive' differ only in case: they are 2 classes" in caplog.text


def test_scores_written_with_a_decimal_comma_ask_for_a_point_not_28_classes(tmp_path):
    write(tmp_path / "train.csv", ["t,s", 'a,"2,5"', 'b,"3,75"', 'c,"1,0"'])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s"))
    assert message == (f"{tmp_path}/train.csv line 2: label '2,5' in column 's' looks like a number with a decimal "
                       "comma, as does every label; write a point (2.5), or set task_type (--task-type) to classification")
    _, spec = load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["t"], "s", task_type="classification")
    assert spec.num_labels == 3  # asked for: classes they are


def test_regression_on_a_single_target_value_is_refused_and_a_constant_validation_set_warned_about(tmp_path, caplog):
    write(tmp_path / "train.csv", ["t,s", "a,2.5", "b,2.5"])
    write(tmp_path / "valid.csv", ["t,s", "a,2.5", "b,3.5"])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "valid.csv", ["t"], "s"))
    assert message == (f"{tmp_path}/train.csv: column 's' holds a single value (2.5); regression needs at least 2 "
                       "different targets")
    load_custom(tmp_path / "valid.csv", tmp_path / "train.csv", ["t"], "s")  # the other way round: trains, warns
    assert "the validation targets are all 2.5: Pearson and Spearman correlations are undefined" in caplog.text


def test_a_text_column_named_label_is_refused_it_would_be_overwritten_by_the_class(tmp_path):
    write(tmp_path / "train.csv", ["label,y", "a,0", "b,1"])
    message = one_line_error(lambda: load_custom(tmp_path / "train.csv", tmp_path / "train.csv", ["label"], "y"))
    assert message == ("text_columns cannot include a column named 'label' (the harness keeps each row's class "
                       "there); rename that column in the files")


def test_a_validation_class_written_in_another_unicode_form_than_the_training_one_is_named_so(tmp_path):
    write(tmp_path / "train.jsonl", ['{"t": "x", "l": "caf\\u00e9"}', '{"t": "y", "l": "tea"}'])
    write(tmp_path / "valid.jsonl", ['{"t": "x", "l": "cafe\\u0301"}'])
    message = one_line_error(lambda: load_custom(tmp_path / "train.jsonl", tmp_path / "valid.jsonl", ["t"], "l"))
    assert message == (f"{tmp_path}/valid.jsonl line 1: label 'cafe\\u0301' is the training file's class 'caf\\xe9' "
                       "written another way; write each class one way")
