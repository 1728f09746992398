"""`sora train --task sft`: causal-LM instruction tuning through TRL's SFTTrainer, on a tiny Llama."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import byte_tokenizer, sft_args
from safetensors.torch import load_file

from soralib.cli import main
from soralib.train import checkpoints
from soralib.train.tasks.generate import final_answer
from soralib.train.tasks.sft_data import read_sft_rows, tokenize_sft

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("_cache")]


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


@pytest.mark.parametrize("step", [2, 4])  # 4: the last (--max-steps 4, inside the first epoch)
def test_an_sft_run_resumed_from_a_checkpoint_goes_on_bitwise_like_the_straight_run(
        tiny_llama, gsm_files, tmp_path, monkeypatch, step):
    monkeypatch.setattr(checkpoints, "KEEP", 100)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(sft_args(tiny_llama, gsm_files, straight, *EVERY_STEP)) == 0
    name = f"checkpoints/stage-1/checkpoint-{step}"
    shutil.copytree(straight / name, resumed / name)
    shutil.copy(straight / "config.yaml", resumed / "config.yaml")  # as if killed right after that checkpoint
    assert main(sft_args(tiny_llama, gsm_files, resumed, *EVERY_STEP, "--resume")) == 0

    assert _steps(resumed) == {s: line for s, line in _steps(straight).items() if s > step}
    assert json.loads((resumed / "metrics.json").read_text())["steps"] == 4
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


