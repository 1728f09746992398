"""What `sora train` leaves reproduces its result: a killed run resumes to the same adapter, `sora eval`, `export` and
`ranks` reuse a finished run, modules the checkpoint lacks are saved, and the same seed gives the same bits."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from conftest import train_args
from soralib.cli import main

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


def test_killed_run_resumed_gives_the_same_metrics_and_adapter(glue_dir, tiny_model, tmp_path):
    common = ["--max-steps", "30", "--save-steps", "3", "--batch-size", "4", "--threshold", "0.005"]
    straight = tmp_path / "straight"
    assert main(train_args(glue_dir, tiny_model, straight, *common)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "soralib.cli", *train_args(glue_dir, tiny_model, killed, *common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").rglob("COMPLETE")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    assert main(train_args(glue_dir, tiny_model, killed, *common, "--resume")) == 0

    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["eval"] == b["eval"] and a["kept_params"] == b["kept_params"]
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, killed))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)


def test_eval_and_export_reuse_a_finished_run(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "4", "--threshold", "0.05")) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert again["validation"]["accuracy"] == saved["eval"]["accuracy"]
    assert main(["export", str(out), "--layout", "uniform"]) == 0
    config = json.loads((out / "adapter-uniform" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["rank_pattern"]


def test_eval_of_an_adalora_run_gives_its_metrics_with_the_task_loss_and_export_refuses_in_one_line(
        glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--method", "adalora", "--max-steps", "4")) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # crashed: AdaLoRA loaded for inference cannot return a loss
    again = json.loads(capsys.readouterr().out)["validation"]
    saved = json.loads((out / "metrics.json").read_text())
    assert again[saved["main_metric"]] == saved["eval"][saved["main_metric"]]
    # eval scores a plain merged model, so an equal loss means training recorded the task loss without
    # AdaLoRA's orthogonality regulariser (0.5 × it had tripled this one)
    assert again["loss"] == pytest.approx(saved["eval"]["loss"], rel=1e-6)
    assert main(["report", str(out)]) == 0
    for command in ("export", "ranks"):
        assert main([command, str(out)]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{out} was trained with method adalora, not sora: only a SoRA run has gates")


def test_a_sora_run_with_an_l1_term_records_the_task_loss_that_eval_gives(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--l1-coef", "1", "--max-steps", "4")) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)["validation"]["loss"]
    assert again == pytest.approx(json.loads((out / "metrics.json").read_text())["eval"]["loss"], rel=1e-6)


def test_ranks_writes_a_lora_config_with_the_ranks_the_run_kept(glue_dir, tiny_model, tmp_path, capsys):
    import peft
    from transformers import BertForSequenceClassification

    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "2", "--threshold", "0.3")) == 0
    kept = {m["module"]: m["kept_rank"] for m in json.loads((out / "sparsity.json").read_text())["modules"]}
    capsys.readouterr()
    assert main(["ranks", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["ranks", str(out), "--out", str(tmp_path / "lora.json")]) == 0
    assert json.loads((tmp_path / "lora.json").read_text()) == printed
    (tmp_path / "cfg").mkdir()
    shutil.copy(tmp_path / "lora.json", tmp_path / "cfg" / "adapter_config.json")
    for config in (peft.LoraConfig(**printed), peft.LoraConfig.from_pretrained(str(tmp_path / "cfg"))):
        model = peft.get_peft_model(BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2), config)
        got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert got == {name: rank for name, rank in kept.items() if rank} and 0 < len(got) < len(kept) + 1
    assert printed["task_type"] == "SEQ_CLS" and "classifier" in printed["modules_to_save"]
    assert printed["base_model_name_or_path"] == str(tiny_model)  # a directory: as the user gave it


def test_a_run_on_minilm_names_the_hub_model_its_weights_come_from(glue_dir, tiny_model, tmp_path, monkeypatch):
    from soralib.train.methods import pretrained as methods  # where load_base looks resolve_model_path up

    monkeypatch.setattr(methods, "resolve_model_path", lambda name: str(tiny_model))  # no real MiniLM in tests
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out, "--max-steps", "1")
    args[args.index("--model") + 1] = "minilm"
    assert main(args) == 0
    for adapter in ("adapter", "sora_adapter"):
        config = json.loads((out / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert methods.base_model_name("org/model") == "org/model"


@pytest.fixture(scope="session")
def tiny_model_without_pooler(tiny_model, tmp_path_factory):
    """The tiny BERT saved without its pooler, as DeBERTa-v3 checkpoints come: loading initialises it randomly."""
    path = tmp_path_factory.mktemp("tiny-bert-no-pooler")
    shutil.copytree(tiny_model, path, dirs_exist_ok=True)
    weights = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".pooler." not in k}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("method", ["sora", "lora", "bitfit"])
def test_modules_missing_from_the_checkpoint_are_saved_so_eval_reproduces_the_run(
        glue_dir, tiny_model_without_pooler, tmp_path, capsys, method):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model_without_pooler, out, "--method", method, "--max-steps", "4")) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0  # a new load of the base draws another random pooler
    again = json.loads(capsys.readouterr().out)["validation"]
    saved = json.loads((out / "metrics.json").read_text())["eval"]
    assert again["loss"] == pytest.approx(saved["loss"], rel=1e-6, abs=1e-7)


def test_a_run_that_added_a_fresh_module_resumes_and_a_listed_parent_is_kept_as_given(
        glue_dir, tiny_model_without_pooler, tmp_path, capsys):
    from soralib.train.config import load_yaml

    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model_without_pooler, out, "--max-steps", "4", "--save-steps", "2")
    assert main(args) == 0
    assert load_yaml(out / "config.yaml")["modules_to_save"] == ["bert.pooler.dense"]  # not PEFT's head names
    (out / "metrics.json").unlink()  # as if killed before the end
    assert main([*args, "--resume"]) == 0
    parent = tmp_path / "parent"
    assert main(train_args(glue_dir, tiny_model_without_pooler, parent, "--max-steps", "4",
                           "--modules-to-save", "pooler")) == 0
    assert load_yaml(parent / "config.yaml")["modules_to_save"] == ["pooler"]
    capsys.readouterr()
    assert main(["eval", str(parent)]) == 0
    again = json.loads(capsys.readouterr().out)["validation"]["loss"]
    assert again == pytest.approx(json.loads((parent / "metrics.json").read_text())["eval"]["loss"], rel=1e-6)


@pytest.mark.parametrize("flags", [["--threshold", "10"], ["--threshold", "0.05", "--layout", "uniform"]],
                         ids=["every_gate_zero", "uniform"])
def test_exported_params_counts_what_the_adapter_stores_and_an_all_zero_run_still_finishes(
        glue_dir, tiny_model, tmp_path, capsys, flags):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "4", *flags)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    stored = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert metrics["exported_params"] == sum(t.numel() for k, t in stored.items() if ".lora_" in k)
    assert (out / "sora_adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["validation"]["loss"] == pytest.approx(metrics["eval"]["loss"], rel=1e-6)


def test_same_seed_gives_bitwise_identical_adapters_and_metrics(glue_dir, tiny_model, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "8", "--threshold", "0.01")) == 0
    a, b = ((json.loads((out / "metrics.json").read_text())) for out in runs)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b
    assert (runs[0] / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs[1] / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_custom_three_class_adapter_loads_in_plain_peft_as_the_readme_says_and_scores_as_sora_eval(
        tiny_model, tmp_path, capsys):
    import random

    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    rng = random.Random(0)
    for split, n in (("train", 48), ("valid", 12)):
        lines = ["text,label_name"] + [f"{' '.join(rng.choice('the cat sat on a mat dog ran'.split()) for _ in range(6))}"
                                       f",{rng.choice(['bird', 'ant', 'cow'])}" for _ in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "mine"
    assert main(["train", "--task", "custom", "--model", str(tiny_model), "--train-file", str(tmp_path / "train.csv"),
                 "--validation-file", str(tmp_path / "valid.csv"), "--text-columns", "text", "--label-column",
                 "label_name", "--output-dir", str(run), "--max-steps", "6", "--batch-size", "8"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    expected = json.loads(capsys.readouterr().out)["validation"]["loss"]

    # README, "What a run directory holds": the head's classes are the run's, not the base checkpoint's 2
    names = json.load(open(run / "metrics.json"))["label_names"]  # the head's classes, in order
    heads = ({"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}} if names
             else {"num_labels": 1})  # regression: one output
    model = AutoPeftModelForSequenceClassification.from_pretrained(run / "adapter", ignore_mismatched_sizes=True,
                                                                   **heads).eval()
    assert names == ["ant", "bird", "cow"] and model.config.label2id == {"ant": 0, "bird": 1, "cow": 2}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = (tmp_path / "valid.csv").read_text().splitlines()[1:]
    texts, labels = zip(*(row.rsplit(",", 1) for row in rows))
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([model.config.label2id[y] for y in labels]))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
