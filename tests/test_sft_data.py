"""`--task sft` rows: what the loss covers, the messages column, final answers, and bad rows refused by file and
line."""

import json

import pytest
from conftest import byte_tokenizer
from data_helpers import write_rows

from soralib.cli import main
from soralib.errors import InputError
from soralib.train.tasks.generate import final_answer, generation_metrics
from soralib.train.tasks.sft_data import read_sft_rows, tokenize_sft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("_cache")]


def test_the_loss_covers_the_completion_tokens_only():
    tokenizer = byte_tokenizer()
    rows = [{"prompt": "2+2?", "completion": "#### 4", "where": "f line 1"}]
    for chat in (True, False):
        (feature,) = tokenize_sft(rows, tokenizer, 64, chat)
        answer = [i for i, label in zip(feature["input_ids"], feature["labels"]) if label != -100]
        assert tokenizer.decode(answer).startswith("#### 4") and answer[-1 if not chat else -2] == tokenizer.eos_token_id
        assert [label for label in feature["labels"] if label != -100] == answer
        prompt = tokenizer.decode([i for i, label in zip(feature["input_ids"], feature["labels"]) if label == -100])
        assert prompt.endswith("assistant\n" if chat else "2+2?\n")


def test_a_messages_column_trains_on_the_last_assistant_message(tiny_llama, tmp_path):
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.csv", "w") as f:
            f.write("messages\n" + "\n".join(['"' + json.dumps(chat).replace('"', '""') + '"'] * 8) + "\n")
    (row,) = read_sft_rows(tmp_path / "train.csv", "prompt", "completion")[:1]
    assert row["prompt"] == chat[:1] and row["completion"] == "hi"
    out = tmp_path / "run"
    assert main(["train", "--task", "sft", "--model", str(tiny_llama), "--train-file", str(tmp_path / "train.csv"),
                 "--validation-file", str(tmp_path / "test.csv"), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    assert "exact_match" not in json.loads((out / "metrics.json").read_text())["eval"]  # no `#### N` to check


def test_final_answers_are_read_after_the_last_marker():
    assert final_answer("5+5=10\n#### 1,000") == "1000"
    assert final_answer("#### 3 then #### -2.5") == "-2.5"
    assert final_answer("no marker") is None
    metrics, _ = generation_metrics([{"prompt": "p", "completion": "#### 7"}] * 2, ["#### 7", "#### 8"])
    assert metrics == {"generated": 2.0, "exact_match": 0.5}


BAD_ROWS = [
    ([{"question": "q", "answer": ""}], "line 1: empty completion"),
    ([{"question": "q"}], "no column 'answer' (--prompt-column / --completion-column) and no 'messages' column"),
    ([{"question": "q", "answer": "a"}, {"question": "q"}], "line 2: missing field 'answer'"),
    ([{"question": 3, "answer": "a"}], "line 1: field 'question' must be a string, got int"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}],
     "line 1: the last message must be the assistant's (the completion), got role 'user'"),
    (["{not json"], "line 1: invalid JSON"),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS)
def test_bad_sft_rows_are_refused_naming_file_and_line(tmp_path, rows, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_sft_rows(write_rows(tmp_path / "train.jsonl", rows), "question", "answer")

