"""Instruction data for causal-LM SFT: rows from JSONL or CSV, and their token ids with a loss on the answer only.

A row is either a prompt and a completion (two named columns: GSM8K's `question` and `answer`), or a chat:
a `messages` column holding a list of {"role", "content"}, whose last message (the assistant's) is the
completion and the ones before it the prompt. In a CSV the `messages` cell is JSON text.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError

from ...errors import InputError
from ..custom import check_data_file, csv_field_limit

logger = logging.getLogger(__name__)
MESSAGES = "messages"
ROLES = ("system", "user", "assistant", "tool")


def read_sft_rows(path: str | Path, prompt_column: str, completion_column: str) -> list[dict[str, Any]]:
    """Rows {"prompt": str or list of messages, "completion": str, "where": "FILE line N"} of one file.

    The file holds prompt and completion columns, or else a `messages` column; every row is checked (a
    missing field, an empty completion, a chat that does not end with the assistant) naming file and line.
    """
    path = Path(path)
    suffix = check_data_file(path)
    raw = list(_csv_records(path) if suffix == ".csv" else _jsonl_records(path))
    if not raw:
        raise InputError(f"{path}: no data rows")
    line, first = raw[0]
    if prompt_column in first and completion_column in first:
        columns = (prompt_column, completion_column)
    elif MESSAGES in first:
        columns = (MESSAGES,)
    else:
        missing = prompt_column if prompt_column not in first else completion_column
        raise InputError(f"{path} line {line}: no column {missing!r} (--prompt-column / --completion-column) and "
                         f"no {MESSAGES!r} column; columns: {', '.join(first)}")
    return [_row(path, line, record, columns) for line, record in raw]


def _csv_records(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as f, csv_field_limit(path):
        reader = csv.DictReader(f)
        for record in reader:
            if None in record or None in record.values():
                raise InputError(f"{path} line {reader.line_num}: wrong number of columns, "
                                 f"expected {len(reader.fieldnames or [])}")
            if MESSAGES in record:
                record[MESSAGES] = _json_cell(path, reader.line_num, record[MESSAGES])
            yield reader.line_num, record


def _json_cell(path: Path, line: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {line}: column {MESSAGES!r} is not JSON ({err.msg}); write the list of "
                         "messages as JSON text") from None


def _jsonl_records(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} line {line}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {line}: expected a JSON object, got {type(record).__name__}")
            yield line, record


def _row(path: Path, line: int, record: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    where = f"{path} line {line}"
    for column in columns:
        if column not in record:
            raise InputError(f"{where}: missing field {column!r}")
    if columns == (MESSAGES,):
        messages = _messages(where, record[MESSAGES])
        prompt, completion = messages[:-1], messages[-1]["content"]
    else:
        prompt, completion = record[columns[0]], record[columns[1]]
        for column, value in zip(columns, (prompt, completion)):
            if not isinstance(value, str):
                raise InputError(f"{where}: field {column!r} must be a string, got {type(value).__name__}")
        if not prompt.strip():
            raise InputError(f"{where}: empty prompt in field {columns[0]!r}")
    if not completion.strip():
        raise InputError(f"{where}: empty completion; every row needs an answer to learn from")
    return {"prompt": prompt, "completion": completion, "where": where}


def _messages(where: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or len(value) < 2:
        raise InputError(f"{where}: {MESSAGES!r} must be a list of at least two messages (a prompt and the "
                         "assistant's answer)")
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise InputError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                             f"a string}}, got {json.dumps(message)[:80]}")
    if value[-1]["role"] != "assistant":
        raise InputError(f"{where}: the last message must be the assistant's (the completion), got role "
                         f"{value[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def uses_chat_template(setting: str, tokenizer) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template: "auto" when it has one, "on" always
    (InputError if it has none), "off" never."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting == "on" and not has:
        raise InputError("--chat-template on: the tokenizer has no chat template; pass --chat-template off "
                         "(prompt and completion joined by a newline) or use a chat model")
    return has and setting != "off"


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
    """The token ids the model sees before its answer, at training and at generation alike."""
    if chat:
        return _ids(tokenizer, _render(tokenizer, prompt))
    if not isinstance(prompt, str):
        raise InputError("rows with a 'messages' column need a chat template; the tokenizer has none or "
                         "--chat-template off was given")
    # The tokenizer's own leading tokens (BOS), never its trailing ones: one that appends EOS to every text
    # would put an EOS between the prompt and its answer.
    text, plain = prompt + "\n", _ids(tokenizer, prompt + "\n")
    framed = list(tokenizer(text)["input_ids"])
    lead = next((k for k in range(len(framed) - len(plain) + 1) if framed[k:k + len(plain)] == plain), 0)
    return framed[:lead] + plain


def answer_ids(tokenizer, prompt: str | list[dict[str, str]], completion: str,
               chat: bool) -> tuple[list[int], list[int], bool]:
    """(prompt ids, answer ids, whether EOS was appended): the answer ends with what stops generation (the end
    of the assistant's turn, or EOS).

    With a chat template the answer is what the whole conversation renders after the prompt. Where the tokens
    differ at the seam (a BPE merge across it, e.g. the prompt's last newline with an answer's leading one), the
    row is the conversation's own tokens and the answer starts where they leave the prompt's: no token of a
    text that is not there (tokenizing the answer alone adds a word-start "▁" in SentencePiece tokenizers). A
    template that ends the assistant's turn with no special token gets EOS appended: else the model never
    learns to stop."""
    if not chat:
        return prompt_ids(tokenizer, prompt, chat), _ids(tokenizer, completion) + [tokenizer.eos_token_id], False
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    head = _render(tokenizer, prompt)  # rendered once: prompt_ids' chat path is _ids of this text
    prompt_part = _ids(tokenizer, head)
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    full = _ids(tokenizer, text)
    if not text.startswith(head):  # e.g. a generation prompt that opens a '<think>' block the conversation lacks
        same = next((i for i, (x, y) in enumerate(zip(head, text)) if x != y), min(len(head), len(text)))
        raise InputError(f"the chat template renders the prompt alone as ...{head[max(0, same - 20):][:60]!r} but "
                         f"the conversation with its answer as ...{text[max(0, same - 20):][:60]!r}")
    shared = next((i for i, (x, y) in enumerate(zip(prompt_part, full)) if x != y), len(prompt_part))
    head_ids, tail = full[:shared], full[shared:]
    if closes_turn(tokenizer, tail):
        return head_ids, tail, False
    return head_ids, tail + [tokenizer.eos_token_id], True


def closes_turn(tokenizer, ids: list[int]) -> bool:
    """Whether `ids` hold a special token other than BOS and UNK (ChatML's <|im_end|>, Llama 3's <|eot_id|>, EOS)."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return bool(special.difference({tokenizer.bos_token_id, tokenizer.unk_token_id}).intersection(ids))


def _render(tokenizer, prompt: str | list[dict[str, str]]) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_sft(rows: list[dict[str, Any]], tokenizer, max_length: int, chat: bool) -> list[dict[str, list[int]]]:
    """Features {"input_ids", "labels"}: labels are -100 on the prompt, so the loss covers the completion only.

    A prompt that leaves no room for a single answer token within max_length is an error (naming the row);
    a completion that does not fit is cut at max_length, and a warning counts the rows cut."""
    features, cut, stopped = [], 0, 0
    for row in rows:
        head, tail, appended = _row_ids(tokenizer, row, chat)
        stopped += appended
        if len(head) >= max_length:
            raise InputError(f"{row['where']}: the prompt is {len(head)} tokens, which leaves no room for the "
                             f"answer within --max-length {max_length}; raise --max-length or shorten the prompt")
        cut += len(head) + len(tail) > max_length
        ids = (head + tail)[:max_length]
        features.append({"input_ids": ids, "labels": [-100] * len(head) + ids[len(head):]})
    if stopped:
        logger.warning("the chat template ends the assistant's turn with no special token: EOS was appended to %d "
                       "of %d answers, so the adapter learns to stop", stopped, len(rows))
    if cut:
        logger.warning("%d of %d rows were longer than --max-length %d: their answers are cut", cut, len(rows),
                       max_length)
    return features


def _row_ids(tokenizer, row: dict[str, Any], chat: bool) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids, whether EOS was appended) of one row. A chat template that raises
    (Mistral's "System role not supported") or does not compile is an InputError naming the row, not a jinja2
    traceback."""
    if not chat and not isinstance(row["prompt"], str):
        raise InputError(f"{row['where']}: a 'messages' row needs a chat template; the tokenizer has none or "
                         "--chat-template off was given")
    fix = ("pass --chat-template off (prompt and completion joined by a newline) or fix the template"
           if isinstance(row["prompt"], str) else
           "change the messages or the template (--chat-template off cannot render a 'messages' row)")
    try:
        return answer_ids(tokenizer, row["prompt"], row["completion"], chat)
    except InputError as err:
        raise InputError(f"{row['where']}: {err}; {fix}") from None
    except TemplateError as err:
        message = (str(err) or type(err).__name__).splitlines()[0]
        if isinstance(err, TemplateSyntaxError):
            message = f"syntax error at template line {err.lineno}: {message}"
        raise InputError(f"{row['where']}: the tokenizer's chat template fails: {message}; {fix}") from None
