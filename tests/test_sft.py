"""`sora train --task sft`: causal-LM instruction tuning through TRL's SFTTrainer, on a tiny Llama."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CHATML, byte_tokenizer, save_tiny_llama
from rejection_helpers import fails_cleanly
from safetensors.torch import load_file

from soralib.cli import main
from soralib.errors import InputError
from soralib.train import checkpoints
from soralib.train.tasks.generate import final_answer, generation_metrics
from soralib.train.tasks.sft_data import read_sft_rows, tokenize_sft

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))


def sft_args(model, data, out, *extra):
    return ["train", "--task", "sft", "--model", str(model), "--train-file", str(data / "train.jsonl"),
            "--validation-file", str(data / "test.jsonl"), "--prompt-column", "question", "--completion-column",
            "answer", "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
            "--max-new-tokens", "12", *extra]


@pytest.fixture(scope="module")
def sora_run(tiny_llama, gsm_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORALIB_CACHE", str(out.parent / "cache"))
        assert main(sft_args(tiny_llama, gsm_files, out)) == 0
    return out


def test_an_sft_run_reports_validation_loss_perplexity_and_exact_match(sora_run):
    metrics = json.loads((sora_run / "metrics.json").read_text())
    assert metrics["task"] == "sft" and metrics["main_metric"] == "loss" and metrics["higher_is_better"] is False
    assert metrics["eval"]["perplexity"] == pytest.approx(torch.tensor(metrics["eval"]["loss"]).exp().item())
    assert metrics["eval"]["generated"] == 8 and 0 <= metrics["eval"]["exact_match"] <= 1
    lines = [json.loads(x) for x in (sora_run / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(x["reference_answer"] == final_answer(x["reference"]) for x in lines)
    config = json.loads((sora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


def test_an_sft_run_evaluated_during_training_reports_what_one_evaluated_only_at_the_end_does(
        sora_run, tiny_llama, gsm_files, tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama, gsm_files, out, "--eval-fraction", "0.5")) == 0  # evaluated at steps 2 and 4
    during = json.loads((out / "metrics.json").read_text())["eval"]
    once = json.loads((sora_run / "metrics.json").read_text())["eval"]
    # the final evaluation reuses step 4's: none of TRL's training counters (num_tokens) come with it
    assert during.keys() == once.keys() and during == pytest.approx(once)


def token_mean_loss(base, run, validation_file) -> float:
    """Σ token losses / Σ completion tokens of the validation rows, one row at a time in plain torch, with the
    run's adapter on the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    rows = read_sft_rows(validation_file, "question", "answer")
    total, tokens = 0.0, 0
    for feature in tokenize_sft(rows, tokenizer, 512, chat=True):
        ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    return total / tokens


def test_the_validation_loss_is_the_mean_over_all_completion_tokens_whatever_the_eval_batch_size_or_packing(
        tiny_llama, gsm_files, tmp_path):
    # 8 validation rows: one batch of 8 (the default 64), 8 batches of 1, batches of 3, 3 and 2; packed into
    # 512-token windows, one window a batch. Trainer's mean of batch means moved by 4e-4 between the first two.
    runs = {"default": (), "one_row": ("--eval-batch-size", "1"), "three_rows": ("--eval-batch-size", "3"),
            "packed_one_window": ("--packing", "--eval-batch-size", "1")}
    reported = {}
    for name, flags in runs.items():
        assert main(sft_args(tiny_llama, gsm_files, tmp_path / name, "--method", "lora", "--max-steps", "1",
                             "--max-generate-samples", "0", *flags)) == 0
        reported[name] = json.loads((tmp_path / name / "metrics.json").read_text())["eval"]["loss"]
        want = token_mean_loss(tiny_llama, tmp_path / name, gsm_files / "test.jsonl")
        assert reported[name] == pytest.approx(want, abs=1e-6, rel=0), name
    # The one step's warm-up lr is 0: every run scores the same weights, so the same loss.
    assert max(reported.values()) - min(reported.values()) <= 1e-6, reported


def test_the_report_of_an_sft_run_shows_sample_generations(sora_run):
    from soralib.report import write_report

    text = write_report(sora_run).read_text()
    assert "## Sample generations" in text and text.count("**Prompt:**") == 3 and "lower is better" in text


GENERATE = textwrap.dedent("""
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base, adapter, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
        out.append(new.tolist())
    assert "soralib" not in sys.modules
    print(json.dumps(out))
""")


def test_the_exported_adapter_generates_the_gated_models_greedy_tokens_with_plain_peft(sora_run, tiny_llama):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import soralib

    prompts = [json.loads(x)["prompt"] for x in (sora_run / "generations.jsonl").read_text().splitlines()][:3]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    soralib.register()
    gated = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                           sora_run / "sora_adapter").eval()
    want = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want.append(gated.generate(input_ids=ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist())
    done = subprocess.run([sys.executable, "-c", GENERATE, str(tiny_llama), str(sora_run / "adapter"),
                           json.dumps(prompts)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == want


@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_each_method_trains_an_sft_run(tiny_llama, gsm_files, tmp_path, method):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama, gsm_files, out, "--method", method, "--max-generate-samples", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["eval"]["loss"] > 0 and metrics["eval"]["generated"] == 2
    assert (out / ("model" if method == "full" else "adapter")).is_dir()


def test_a_budget_sft_run_with_packing_and_accumulation_ends_within_the_budget(tiny_llama, gsm_files, tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama, gsm_files, out, "--target-rank", "2", "--packing", "--max-length", "96",
                         "--gradient-accumulation-steps", "2", "--gradient-checkpointing",
                         "--max-generate-samples", "0")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["kept_rank"] <= 2 * len(sparsity["modules"])
    assert metrics["steps"] == 4 and "exact_match" not in metrics["eval"]


EVERY_STEP = ("--save-steps", "1", "--max-generate-samples", "0")


def test_an_sft_run_resumed_from_a_checkpoint_goes_on_bitwise_like_the_straight_run(
        tiny_llama, gsm_files, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "KEEP", 100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(sft_args(tiny_llama, gsm_files, straight, *EVERY_STEP)) == 0
    name = "checkpoints/stage-1/checkpoint-2"
    shutil.copytree(straight / name, resumed / name)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")  # as if killed right after that checkpoint
    assert main(sft_args(tiny_llama, gsm_files, resumed, *EVERY_STEP, "--resume")) == 0

    assert _steps(resumed) == {s: line for s, line in _steps(straight).items() if s > 2}
    ta, tb = (load_file(str(d / "sora_adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_an_adalora_sft_run_resumed_after_its_allocation_began_goes_on_bitwise_like_the_straight_run(
        tiny_llama, gsm_files, tmp_path, monkeypatch):
    # 20 steps: AdaLoRA allocates ranks from step 3 on, finally at step 16; its checkpoints used to hold the adapter
    # cut down to the ranks kept, which the resumed run (every rank) could not load: size mismatch
    monkeypatch.setattr(checkpoints, "KEEP", 100)
    every_step = (*EVERY_STEP, "--method", "adalora", "--adalora-target-r", "2", "--max-steps", "20")
    straight = tmp_path / "straight"
    assert main(sft_args(tiny_llama, gsm_files, straight, *every_step)) == 0
    for step in (10, 18):  # while AdaLoRA allocates, after its final allocation
        resumed, name = tmp_path / f"resumed-{step}", f"checkpoints/stage-1/checkpoint-{step}"
        shutil.copytree(straight / name, resumed / name)
        shutil.copy(straight / "config.yaml", resumed / "config.yaml")
        assert main(sft_args(tiny_llama, gsm_files, resumed, *every_step, "--resume")) == 0
        assert _steps(resumed) == {s: line for s, line in _steps(straight).items() if s > step}
        ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, resumed))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
        assert a["eval"] == b["eval"] and a["kept_params"] == b["kept_params"]


def _steps(run):
    lines = (json.loads(x) for x in (run / "history.jsonl").read_text().splitlines())
    return {x["step"]: {k: v for k, v in x.items() if k != "elapsed_seconds"} for x in lines if "loss" in x}


def test_an_sft_run_resumes_with_only_its_output_dir(tiny_llama, gsm_files, tmp_path):
    # the command Ctrl-C prints: the sft task's max_length (512), filled in by validation, is no flag of the user's
    from soralib.cli import build_parser, train_config
    from soralib.train.config import save_yaml

    out = tmp_path / "run"
    out.mkdir()  # as a run killed before its first checkpoint leaves it: only config.yaml
    save_yaml(train_config(build_parser().parse_args(sft_args(tiny_llama, gsm_files, out, *EVERY_STEP))),
              out / "config.yaml")
    assert "max_length: 512\n" in (out / "config.yaml").read_text()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0 and (out / "metrics.json").is_file()


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


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


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
        read_sft_rows(_write(tmp_path / "train.jsonl", rows), "question", "answer")


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
            _write(data / f"{split}.jsonl", rows)
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


def test_sora_eval_of_an_sft_run_points_to_its_metrics(sora_run, capsys):
    assert main(["eval", str(sora_run)]) == 2
    assert "sora eval re-scores classification runs; an sft run's scores are in its metrics.json" in capsys.readouterr().err


def test_the_readme_trl_snippet_trains_prunes_and_exports_a_plain_lora(tiny_llama, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    import soralib

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    data = Dataset.from_list([{"prompt": f"{a}+{a}=", "completion": f"{2 * a}"} for a in range(16)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), learning_rate=8e-4, max_steps=6, per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, save_strategy="no")
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=byte_tokenizer(),
                         peft_config=soralib.SoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        task_type="CAUSAL_LM"),
                         callbacks=[soralib.SoraCallback(threshold=3e-4), soralib.SoraBudgetCallback(target_rank=4)])
    trainer.train()
    report = soralib.sparsity_report(trainer.model)
    assert report["kept_rank"] <= 4 * 14 and len(report["modules"]) == 14  # 7 kinds × 2 layers
    soralib.export_lora(trainer.model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


def test_generation_stops_at_an_end_token_the_generation_config_names_besides_eos(tiny_llama):
    # chat models end a turn with a token that is not EOS (Gemma's <end_of_turn>), named in generation_config.json
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soralib.train.tasks.generate import generate
    from soralib.train.tasks.sft_data import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = torch.tensor([prompt_ids(tokenizer, "Tom has 3 apples.", chat=True)])
    with torch.no_grad():
        free = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    free = free.tolist()
    end = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] != tokenizer.eos_token_id)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, free[end]]
    text, = generate(model, tokenizer, [{"prompt": "Tom has 3 apples."}], chat=True, max_new_tokens=8, batch_size=1)
    assert text == tokenizer.decode(free[:end + 1], skip_special_tokens=True)


def test_split_seed_on_sft_says_the_task_does_not_split_not_to_add_protocol_paper(tiny_llama, gsm_files, tmp_path,
                                                                                  capsys):
    # the hint was "with --protocol paper", which sft then refuses in turn
    out = tmp_path / "run"
    err = fails_cleanly(capsys, sft_args(tiny_llama, gsm_files, out, "--split-seed", "3"),
                        "--split-seed is used only with ", out)
    assert "got task 'sft'" in err and "--protocol paper" not in err
