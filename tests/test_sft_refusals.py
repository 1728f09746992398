"""`sora train --task sft` refuses, before anything is written, what would fail mid-run: prompts or generations
past the model's positions, tokenizers without EOS or a working chat template, encoders, flags of the other tasks."""

import json
import re

import pytest
from conftest import CHATML, save_tiny_llama, sft_args
from data_helpers import write_rows
from rejection_helpers import fails_cleanly

from soralib.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("_cache")]


def test_a_prompt_longer_than_max_length_is_refused_before_anything_is_written(tiny_llama, gsm_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama, gsm_files, out, "--max-length", "20")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar
    assert err.startswith("sora train: error: ") and "train.jsonl line 1: the prompt is" in err and "--max-length 20" in err
    assert not out.exists()


def test_generations_past_the_models_positions_are_refused_before_anything_is_written(tiny_llama, gsm_files,
                                                                                        tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama, gsm_files, out, "--max-new-tokens", "1000")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"sora train: error: max_new_tokens 1000: the longest of the \d+ prompts to generate from is "
                        r"(\d+) tokens, and \1 \+ 1000 is more than the model's 1024 positions "
                        r"\(max_position_embeddings\); pass --max-new-tokens \d+ or less, or fewer "
                        r"--max-generate-samples", err), err
    assert not out.exists()
    room = 1024 - int(re.search(r"is (\d+) tokens", err).group(1))  # the suggested value runs
    assert main(sft_args(tiny_llama, gsm_files, out, "--max-new-tokens", str(room), "--max-generate-samples", "1",
                         "--max-steps", "1")) == 0


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_refused(gsm_files, tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "plain", chat_template=False)
    out = tmp_path / "run"
    assert main(sft_args(model, gsm_files, out, "--chat-template", "on")) == 2
    assert "--chat-template on: the tokenizer has no chat template" in capsys.readouterr().err
    assert not out.exists()
    assert main(sft_args(model, gsm_files, out, "--max-generate-samples", "1")) == 0  # auto: prompt, newline, answer


def _llama_with(path, tokenizer_config=None, chat_template=None):
    """The tiny Llama saved at `path` with its tokenizer_config.json edited (key -> None deletes it) or another
    chat template."""
    save_tiny_llama(path)
    if tokenizer_config:
        settings = json.loads((path / "tokenizer_config.json").read_text())
        settings.update(tokenizer_config)
        settings = {k: v for k, v in settings.items() if v is not None}
        (path / "tokenizer_config.json").write_text(json.dumps(settings))
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    return path


@pytest.mark.parametrize("drop, flags", [({"eos_token": None}, ["--chat-template", "off"]),
                                         ({"eos_token": None, "pad_token": None}, [])], ids=["pad-kept", "no-pad"])
def test_a_tokenizer_without_eos_is_refused_before_anything_is_written(gsm_files, tmp_path, capsys, drop, flags):
    # It crashed in TRL's collator ("Could not infer dtype of NoneType"), or failed on the missing pad token, with
    # config.yaml, checkpoints/ and logs/ written, so that a second try was refused as "not empty".
    model = _llama_with(tmp_path / "noeos", drop)
    out = tmp_path / "run"
    fails_cleanly(capsys, sft_args(model, gsm_files, out, *flags),
                  f"model {str(model)!r}: its tokenizer has no EOS token, which --task sft needs to end each answer "
                  "(and to pad with); set eos_token in its tokenizer_config.json", out)


@pytest.mark.parametrize("which", ["tiny-bert", "minilm"])
def test_an_encoder_is_refused_as_an_sft_model_before_anything_is_written(tiny_model, gsm_files, tmp_path, capsys,
                                                                          which):
    name = str(tiny_model) if which == "tiny-bert" else "minilm"
    out = tmp_path / "run"
    fails_cleanly(capsys, sft_args(name, gsm_files, out),
                  f"model {name!r} is an encoder (bert), not a causal LM: --task sft needs a decoder such as Llama, "
                  "Qwen or GPT-2", out)


RAISES = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}" + CHATML[len("{% for m in messages %}"):])


@pytest.mark.parametrize("template, data, expected", [
    (RAISES, "messages", ("train.jsonl line 1: the tokenizer's chat template fails: System role not supported; "
                          "change the messages or the template (--chat-template off cannot render a 'messages' row)")),
    ("{% for m in messages %}{{ m['role'] }", "gsm", ("train.jsonl line 1: the tokenizer's chat template fails: syntax "
     "error at template line 1: unexpected '}'; pass --chat-template off (prompt and completion joined by a newline) "
     "or fix the template")),
], ids=["raises-on-a-system-message", "syntax-error"])
def test_a_chat_template_that_fails_is_refused_naming_the_row_before_anything_is_written(
        gsm_files, tmp_path, capsys, template, data, expected):
    model = _llama_with(tmp_path / "model", chat_template=template)
    if data == "messages":
        rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "#### 4"}]}] * 4
        data = tmp_path / "msgs"
        data.mkdir()
        for split in ("train", "test"):
            write_rows(data / f"{split}.jsonl", rows)
    else:
        data = gsm_files
    out = tmp_path / "run"
    fails_cleanly(capsys, sft_args(model, data, out), f"{data / expected}", out)


@pytest.mark.parametrize("flags, message", [
    (["--packing"], "--packing is used only with task sft, got task 'rte'"),
    (["--prompt-column", "q"], "--prompt-column is used only with task sft, got task 'rte'"),
])
def test_sft_flags_on_a_classification_task_are_refused(flags, message, tmp_path, capsys):
    assert main(["train", "--task", "rte", "--model", "x", "--output-dir", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_packing_with_adalora_needs_max_steps(tiny_llama, gsm_files, tmp_path, capsys):
    args = sft_args(tiny_llama, gsm_files, tmp_path / "o", "--method", "adalora", "--packing", "--max-steps", "-1")
    assert main(args) == 2  # the last --max-steps wins: unset
    assert "--packing with method adalora needs --max-steps" in capsys.readouterr().err


def test_classification_flags_on_an_sft_task_are_refused(tiny_llama, gsm_files, tmp_path, capsys):
    assert main(sft_args(tiny_llama, gsm_files, tmp_path / "o", "--protocol", "paper")) == 2
    assert "--protocol is used only with a GLUE task or custom, got task 'sft'" in capsys.readouterr().err


def test_sft_needs_its_files(tiny_llama, tmp_path, capsys):
    assert main(["train", "--task", "sft", "--model", str(tiny_llama), "--output-dir", str(tmp_path / "o")]) == 2
    assert "task sft needs train_file and validation_file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_split_seed_on_sft_says_the_task_does_not_split_not_to_add_protocol_paper(tiny_llama, gsm_files, tmp_path,
                                                                                  capsys):
    # the hint was "with --protocol paper", which sft then refuses in turn
    out = tmp_path / "run"
    err = fails_cleanly(capsys, sft_args(tiny_llama, gsm_files, out, "--split-seed", "3"),
                        "--split-seed is used only with ", out)
    assert "got task 'sft'" in err and "--protocol paper" not in err



@pytest.mark.parametrize("method", ["sora", "lora"])
def test_an_adapter_on_the_output_layer_is_refused_before_anything_is_written(tiny_llama, gsm_files, tmp_path, capsys,
                                                                              method):
    # TRL's SFTTrainer refused it, after config.yaml and the lock were written
    out = tmp_path / "run"
    argv = sft_args(tiny_llama, gsm_files, out, "--method", method, "--target-modules", "q_proj,lm_head")
    fails_cleanly(capsys, argv, "--target-modules reaches the output layer 'lm_head', which --task sft cannot adapt: "
                                "the loss is computed from its weight directly, so its adapter would never train; "
                                "leave it out of --target-modules", out)


def test_bitfit_on_a_model_without_biases_is_refused_before_anything_is_written(tiny_llama, gsm_files, tmp_path,
                                                                               capsys):
    # nothing to train: the first backward failed with a traceback, after config.yaml and checkpoints/ were written
    out = tmp_path / "run"
    fails_cleanly(capsys, sft_args(tiny_llama, gsm_files, out, "--method", "bitfit"),
                  f"--method bitfit: model {str(tiny_llama)!r} has no bias and no task head to train (a Llama-type "
                  "decoder has no biases); use --method lora or sora", out)


def test_the_same_column_as_prompt_and_completion_is_refused(tiny_llama, gsm_files, tmp_path, capsys):
    # the model would learn to repeat its prompt, and every exact match would be trivial
    out = tmp_path / "o"
    fails_cleanly(capsys, sft_args(tiny_llama, gsm_files, out, "--completion-column", "question"),
                  "--prompt-column and --completion-column are both 'question': name two columns", out)


def test_messages_rows_without_a_chat_template_are_refused_naming_the_file(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "plain", chat_template=False)
    chat = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}] * 4
    train, dev = write_rows(tmp_path / "train.jsonl", chat), write_rows(tmp_path / "dev.jsonl", chat)
    out = tmp_path / "o"
    args = ["train", "--task", "sft", "--model", model, "--train-file", train, "--validation-file", dev,
            "--output-dir", out, "--max-steps", "1"]
    fails_cleanly(capsys, args, f"{train} line 1: a 'messages' row needs a chat template; the tokenizer has none "
                                "or --chat-template off was given", out)


def test_a_model_directory_without_tokenizer_files_is_refused_with_the_whole_reason(gsm_files, tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    out = tmp_path / "run"
    # transformers lists its reasons on the lines after "... from one of:"; the first line alone ended there
    err = fails_cleanly(capsys, sft_args(model, gsm_files, out), f"cannot load model {str(model)!r} as a causal LM: ",
                        out)
    assert not err.rstrip().endswith(":") and len(err.strip().splitlines()[-1]) > 100
