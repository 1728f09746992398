"""Data layer, GLUE: the task registry, GLUE TSV files (each task's layout, and every malformed file named with
its line), and the hub loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import RTE_HEADER, write, write_rte
from soralib.errors import InputError
from soralib.train.data import load_glue_dir, load_hub
from soralib.train.tasks import get_task

REAL_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


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
