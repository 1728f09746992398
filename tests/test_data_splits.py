"""Data layer, evaluation splits: the paper protocol's split of small and large tasks, the default protocol, and
MNLI's mismatched dev set under both."""

from __future__ import annotations

import pytest
import torch

from soralib.errors import InputError
from soralib.train.data import make_splits, paper_split
from soralib.train.tasks import get_task


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
