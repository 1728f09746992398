"""Data layer of the training harness: evaluation splits and tokenization of the rows the loaders return
(GLUE: glue_data.py, custom files: custom.py; both importable from here).

Rows are plain dicts holding a task's text columns and ``label`` (a class index into
``TaskSpec.label_names``, or a float for regression). Loaders return ``{split name: rows}`` with the
splits ``"train"`` and ``TaskSpec.eval_splits`` (``"validation"``, or MNLI's matched/mismatched pair).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from soralib.errors import InputError
from soralib.io import atomic_write_json
from soralib.train.custom import Rows, load_custom  # load_custom: API
from soralib.train.glue_data import GLUE_TSV, load_glue_dir, load_hub  # noqa: F401 (API: GLUE loading lives there)
from soralib.train.tasks import TaskSpec

logger = logging.getLogger(__name__)

__all__ = [
    "load_glue_dir", "load_hub", "load_custom", "paper_split", "make_splits",
    "tokenize_rows", "tokenizer_fingerprint", "check_max_length", "rows_fingerprint",
]

PAPER_LARGE_VALIDATION_ROWS = 1000  # training rows held out for model selection on large tasks
CACHE_FORMAT = 2  # bump when the layout of cached tokenized features changes
# Parts of a saved tokenizer that do not decide its ids, dropped from its fingerprint. tokenizer.json: the
# truncation and padding of the last call (each call sets its own). tokenizer_config.json: how it was loaded.
_NOT_DEFINITION = {"tokenizer.json": ("truncation", "padding"),
                   "tokenizer_config.json": ("is_local", "local_files_only")}
# Read at call time but not always saved by save_pretrained (add_*_token never is, the sides only when passed
# to __init__)
_CALL_ATTRIBUTES = ("truncation_side", "padding_side", "split_special_tokens", "add_bos_token", "add_eos_token")


# ------------------------------------------------------------------------------------------ splits


def _shuffled_indices(n: int, seed: int) -> list[int]:
    """The paper code's shuffle: ``torch.randperm`` with a generator seeded by `seed`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def paper_split(task_spec: TaskSpec, train_rows: Rows, dev_rows: Rows, seed: int) -> dict[str, Rows]:
    """The SoRA paper code's evaluation protocol; returns ``{"train", "validation", "test"}``.

    Small tasks: the shuffled dev set is cut in half, the first half validates (model selection),
    the second half is the test set. Large tasks: 1000 shuffled training rows are held out for
    validation and the dev set is the test set.
    """
    if task_spec.is_large:
        if len(train_rows) <= PAPER_LARGE_VALIDATION_ROWS:
            raise InputError(f"task {task_spec.name!r}: the paper split needs more than "
                             f"{PAPER_LARGE_VALIDATION_ROWS} training rows, got {len(train_rows)}")
        order = _shuffled_indices(len(train_rows), seed)
        return {
            "train": [train_rows[i] for i in order[PAPER_LARGE_VALIDATION_ROWS:]],
            "validation": [train_rows[i] for i in order[:PAPER_LARGE_VALIDATION_ROWS]],
            "test": list(dev_rows),
        }
    half = len(dev_rows) // 2
    if half == 0:
        raise InputError(f"task {task_spec.name!r}: the paper split needs at least 2 dev rows")
    order = _shuffled_indices(len(dev_rows), seed)
    return {
        "train": list(train_rows),
        "validation": [dev_rows[i] for i in order[:half]],
        "test": [dev_rows[i] for i in order[half:]],
    }


def make_splits(task_spec: TaskSpec, loaded: dict[str, Rows], protocol: str = "default", seed: int = 42) -> dict:
    """Turn loaded splits into ``{"train", "validation", "test"}`` under `protocol` ("default" or "paper").

    Default: validation = the (first) dev set, test = None. Paper: see `paper_split`. Further dev sets
    (MNLI mismatched) are kept whole, as ``validation_mismatched`` (default) or ``test_mismatched``
    (paper); every split but "train" is meant to be evaluated and reported.
    """
    first, *others = task_spec.eval_splits
    if protocol == "default":
        splits: dict[str, Rows | None] = {"train": loaded["train"], "validation": loaded[first], "test": None}
        splits.update({name: loaded[name] for name in others})
    elif protocol == "paper":
        splits = dict(paper_split(task_spec, loaded["train"], loaded[first], seed))
        splits.update({name.replace("validation", "test", 1): loaded[name] for name in others})
    else:
        raise InputError(f"unknown evaluation protocol {protocol!r}; allowed: default, paper")
    return splits


# -------------------------------------------------------------------------------------- tokenizing


def tokenize_rows(
    rows: Rows,
    tokenizer: Any,
    text_columns: Sequence[str],
    max_length: int,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Tokenize rows (truncated to `max_length`, not padded) into features with ``labels``.

    With `cache_dir`, features are cached as JSON under a sha256 of the tokenizer's definition (see
    `tokenizer_fingerprint`, not its path), `max_length`, `text_columns` and the rows, so any change to these
    misses the cache. A tokenizer that cannot be saved is not cached.
    """
    text_columns = tuple(text_columns)
    # Below this, truncation is switched off (the tokenizer cannot cut to a length its special tokens exceed)
    # and every row goes in whole, or only the special tokens are left.
    specials = tokenizer.num_special_tokens_to_add(pair=len(text_columns) == 2)
    if max_length < specials + len(text_columns):
        what = "a pair" if len(text_columns) == 2 else "a text"
        raise InputError(f"max_length must be at least {specials + len(text_columns)} for this tokenizer (it adds "
                         f"{specials} special tokens to {what}, and each text needs one of its own), got {max_length}")
    path = None
    fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    if fingerprint is not None:
        key = _cache_key(rows, tokenizer, fingerprint, text_columns, max_length)
        path = Path(cache_dir) / f"tokenized-{key}.json"
        cached = _read_cache(path)
        if cached is not None:
            logger.info("loaded %d tokenized rows from %s", len(cached), path)
            return cached
    features = []
    for start in range(0, len(rows), 1000):
        chunk = rows[start : start + 1000]
        columns = [[row[c] for row in chunk] for c in text_columns]
        if len(columns) == 2:
            pairs = [clip_pair(tokenizer, a, b, max_length) for a, b in zip(*columns)]
            columns = [[pair[0] for pair in pairs], [pair[1] for pair in pairs]]
        encoded = tokenizer(*columns, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for i, row in enumerate(chunk):
            features.append({**{k: list(encoded[k][i]) for k in keys}, "labels": row["label"]})
    if path is not None:
        atomic_write_json(path, {"format": CACHE_FORMAT, "features": features})
        logger.info("cached %d tokenized rows in %s", len(features), path)
    return features


def clip_pair(tokenizer: Any, a: str, b: str, max_length: int) -> tuple[str, str]:
    """The pair with its long texts cut where truncation to `max_length` tokens cannot reach, so the pair's
    truncation ("longest_first": 2.7 GB and 5 s for a text of 20,000 words, tokenizers 0.23; a single text
    truncates at once) gets short texts and keeps the same tokens. Its result depends on the two lengths only
    through which text is longer and how long the shorter one is up to max_length / 2: so each text keeps
    more than max_length tokens, cut before a word (those tokens are unchanged), and the longer stays longer.
    Left alone: short texts, two different texts of equal length, left truncation, slow tokenizers."""
    if max(len(a), len(b)) <= 8 * max_length or getattr(tokenizer, "truncation_side", "right") != "right":
        return a, b
    counts = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (a, b)]
    if counts[0] == counts[1] and a != b:  # a tie: which one loses the odd token is the tokenizer's rule
        return a, b
    order = (0, 1) if counts[0] <= counts[1] else (1, 0)
    texts = [a, b]
    short, kept = _cut(tokenizer, texts[order[0]], counts[order[0]], max_length + 1)
    long = short if a == b else _cut(tokenizer, texts[order[1]], counts[order[1]], max(max_length, kept) + 1)[0]
    return (short, long) if order == (0, 1) else (long, short)


def _cut(tokenizer: Any, text: str, count: int, least: int) -> tuple[str, int]:
    """(text, its tokens): cut before the first word that starts after its first `least` tokens; whole when it
    is no longer, has no such word within 2·least tokens, or the tokenizer gives no word ids (slow ones)."""
    if count <= least:
        return text, count
    encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=2 * least,
                        return_offsets_mapping=True)
    try:
        words = encoded.word_ids()
    except (ValueError, AttributeError):
        return text, count
    cut = next((j for j in range(least, len(words)) if words[j] != words[least - 1]), None)
    return (text, count) if cut is None else (text[: encoded["offset_mapping"][cut][0]], cut)


def check_max_length(max_length: int, model: Any) -> None:
    """An example longer than the model's position table fails in the forward pass, mid-run: refuse it up front."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise InputError(f"max_length {max_length} is more than the model's {positions} positions "
                         f"(max_position_embeddings); pass --max-length {positions} or less")


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of all that decides `tokenizer`'s ids, or None if it cannot be saved.

    The files `save_pretrained` writes (for a fast tokenizer tokenizer.json: vocabulary, normalizer,
    pre-tokenizer, post-processor, added tokens; the config: init settings and special tokens; chat
    templates; a slow one's vocabulary files), hashed in sorted order, and the attributes in
    `_CALL_ATTRIBUTES`. The path it was loaded from is not part of it: two directories holding the same
    tokenizer share it, one directory re-saved with another tokenizer does not.
    """
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="soralib-tokenizer-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except NotImplementedError:  # a python tokenizer without save_vocabulary
            logger.warning("not caching tokenized rows: the %s cannot be saved, so its ids have no cache key",
                           type(tokenizer).__name__)
            return None
        for file in sorted(f for f in Path(tmp).rglob("*") if f.is_file()):
            name = file.relative_to(tmp).as_posix()
            content = file.read_bytes()
            if name in _NOT_DEFINITION:
                saved = json.loads(content)
                for field in _NOT_DEFINITION[name]:
                    saved.pop(field, None)
                content = json.dumps(saved).encode()
            digest.update(f"\n{name} {len(content)}\n".encode() + content)
    attributes = {name: getattr(tokenizer, name, None) for name in _CALL_ATTRIBUTES}
    digest.update(json.dumps(attributes, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def rows_fingerprint(rows: Rows) -> str:
    """sha256 of a split's rows (texts and labels, in order): what a score was measured on."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(b"\n" + json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _cache_key(rows: Rows, tokenizer: Any, fingerprint: str, text_columns: tuple[str, ...], max_length: int) -> str:
    digest = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT,
        "tokenizer": fingerprint,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "max_length": max_length,
        "text_columns": list(text_columns),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for row in rows:
        digest.update(b"\n" + json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") == CACHE_FORMAT and isinstance(data.get("features"), list):
            return data["features"]
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("ignoring unreadable tokenization cache %s: %s", path, exc)
    return None


