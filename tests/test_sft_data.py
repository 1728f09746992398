"""`--task sft` rows: what the loss covers, the messages column, final answers, and bad rows refused by file and
line."""

import json

import pytest
from conftest import CHATML, byte_tokenizer
from data_helpers import write_rows

from soralib.cli import main
from soralib.errors import InputError
from soralib.train.tasks.generate import final_answer, generation_metrics
from soralib.train.tasks.sft_data import closes_turn, prompt_ids, read_sft_rows, tokenize_sft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("_cache")]

# ChatML whose generation prompt opens a thinking block the rendered conversation does not hold (DeepSeek-R1 style)
CHATML_THINK = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")


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



def answer_of(tokenizer, feature) -> str:
    return tokenizer.decode([i for i, label in zip(feature["input_ids"], feature["labels"]) if label != -100])


def test_a_chat_template_that_ends_turns_with_a_plain_newline_still_teaches_the_model_to_stop(caplog):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    (feature,) = tokenize_sft([{"prompt": "10 plus 18?", "completion": "28", "where": "f line 1"}], tokenizer, 64, True)
    assert answer_of(tokenizer, feature) == "28\n<|im_end|>"  # without EOS it would never learn to stop
    assert "EOS was appended to 1 of 1 answers" in caplog.text
    caplog.clear()
    (feature,) = tokenize_sft([{"prompt": "q", "completion": "a", "where": "f line 1"}], byte_tokenizer(), 64, True)
    assert answer_of(byte_tokenizer(), feature) == "a<|im_end|>\n"  # ChatML closes the turn itself: nothing added
    assert "EOS is appended" not in caplog.text


def test_an_answer_whose_first_token_merges_with_the_prompts_last_trains_on_the_conversations_own_tokens():
    tokenizer = byte_tokenizer(merges=(("Ċ", "Ċ"),))  # "\n\n" is one token
    rows = [{"prompt": "Write code", "completion": "\n\ndef f():\n    return 7", "where": "f line 1"}]
    (feature,) = tokenize_sft(rows, tokenizer, 128, True)
    # the row is the conversation as the tokenizer cuts it (no text added or lost), the loss starts where its
    # tokens leave the prompt's: the prompt's last newline merged into the answer's first token
    conversation = tokenizer.apply_chat_template([{"role": "user", "content": "Write code"},
                                                  {"role": "assistant", "content": rows[0]["completion"]}],
                                                 tokenize=False)
    assert tokenizer.decode(feature["input_ids"]) == conversation
    prompt = prompt_ids(tokenizer, "Write code", True)
    head = feature["input_ids"][:sum(label == -100 for label in feature["labels"])]
    assert head == prompt[:-1] and answer_of(tokenizer, feature) == "\n\n\ndef f():\n    return 7<|im_end|>\n"


def test_a_chat_row_renders_the_template_once_for_its_prompt_and_once_for_the_conversation(monkeypatch):
    tokenizer = byte_tokenizer()
    calls, render = [], tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: calls.append(k) or render(*a, **k))
    rows = [{"prompt": f"q{i}", "completion": "a", "where": f"f line {i}"} for i in range(3)]
    features = tokenize_sft(rows, tokenizer, 64, True)
    assert len(calls) == 2 * len(rows) and sum(k.get("add_generation_prompt", False) for k in calls) == len(rows)
    assert features[0]["input_ids"][:len(prompt_ids(tokenizer, "q0", True))] == prompt_ids(tokenizer, "q0", True)


def test_an_unknown_token_in_an_answer_is_no_end_of_turn():
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    answer = tokenizer("it is 4", add_special_tokens=False)["input_ids"]
    assert not closes_turn(tokenizer, answer + [tokenizer.unk_token_id])
    assert closes_turn(tokenizer, answer + [tokenizer.eos_token_id])


def test_a_template_that_renders_the_prompt_otherwise_than_the_conversation_is_refused_naming_the_row():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHATML_THINK
    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "where": "chat.jsonl line 3"}]
    with pytest.raises(InputError) as err:
        tokenize_sft(rows, tokenizer, 64, True)
    message = str(err.value)
    assert message.startswith("chat.jsonl line 3: the chat template renders the prompt alone as ")
    assert "<think>" in message and "--chat-template off cannot render a 'messages' row" in message


def test_without_a_chat_template_a_tokenizer_that_frames_every_text_puts_no_eos_inside_the_prompt():
    tokenizer = byte_tokenizer(chat_template=False, framed=True)
    ids = prompt_ids(tokenizer, "Tom has 16 apples.", False)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    (feature,) = tokenize_sft([{"prompt": "2+2?", "completion": "4", "where": "f line 1"}], tokenizer, 64, False)
    assert tokenizer.decode(feature["input_ids"]) == "<s>2+2?\n4</s>"
