"""The rows of docs/errors.md for `sora train`'s flags and config files (YAML, DeepSpeed JSON), and the CLI's
usage errors: exit 2, one line on stderr, nothing written."""

import os

import pytest

from conftest import train_args
from rejection_helpers import _write, fails_cleanly
from soralib.cli import main
from soralib.errors import InputError

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")

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
    ("bool", ["--group-by-length", "maybe"], "group_by_length must be true or false, got 'maybe'"),
    ("int", ["--r", "1.5"], "r must be an integer, got '1.5'"),
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
    ("max-steps-negative", ["--max-steps", "-5"], "max_steps must be an integer >= 1 (or -1: unset, epochs decide), got -5"),
    ("max-steps-0", ["--max-steps", "0"], "max_steps must be an integer >= 1 (or -1: unset, epochs decide), got 0"),
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
    ("budget-ramp-without-budget", ["--budget-ramp", "trim"],
     "--budget-ramp is used only with a budget (--target-rank or --target-params), got target_rank None"),
    ("threshold-with-trim-ramp", ["--budget-ramp", "trim", "--target-rank", "2", "--threshold", "0.5"],
     "--threshold is used only without --budget-ramp trim (it sets no threshold), got budget_ramp 'trim'"),
    ("budget-ramp-unknown", ["--budget-ramp", "fast", "--target-rank", "2"],
     "budget_ramp must be one of threshold, trim, got 'fast'"),
    ("target-modules-all-linear-and-more", ["--target-modules", "all-linear,query"],
     "target_modules 'all-linear' must be the only entry (it names every linear layer), got all-linear,query"),
    ("target-modules-one-typo", ["--target-modules", "query,vlaue"],
     "target_modules entry 'vlaue' matches no module of the model; closest linear modules: classifier, query, value"),
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
     "--r is used only without --lora-config (the file's value replaces it), got lora_config "
     f"'{os.path.abspath('ranks.json')}'"),  # made absolute, as config.yaml keeps it
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
    ("target-params-below-one-rank", ["--target-params", "10"],
     "target_params must be in [832, 6656] for this model (min_rank 1 to r_max ranks in each of its 12 adapted "
     "modules), got 10"),
    ("target-params-above-r", ["--target-params", "100000000"], "got 100000000"),
    # RTE is a pair: [CLS] a [SEP] b [SEP]; below that the tokenizer turned truncation off and the run crashed
    ("max-length-below-special-tokens", ["--max-length", "3"],
     "max_length must be at least 5 for this tokenizer (it adds 3 special tokens to a pair, and each text needs one "
     "of its own), got 3"),
    # --min-rank 0: a budget below one rank keeps none (an empty adapter after the whole run)
    ("target-params-below-one-rank-min-rank-0", ["--min-rank", "0", "--target-params", "10"],
     "target_params must be in [64, 6656] for this model (min_rank 0, yet one rank at least, to r_max ranks in each "
     "of its 12 adapted modules), got 10"),
    ("target-rank-below-one-rank-min-rank-0", ["--min-rank", "0", "--target-rank", "0.05"],
     "target_rank must be in [0.0833333, 8] for this model (min_rank 0, yet one rank at least, to the mean r_max of "
     "its 12 adapted modules), got 0.05"),
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


@pytest.mark.parametrize("saved, method, field", [
    ({"target_rank": "4"}, "lora", "target_rank"),
    ({"target_rank": "4"}, "adalora", "target_rank"),
    ({"target_params": "5000"}, "full", "target_params"),
    ({"schedule": "linear"}, "lora", "schedule"),
    ({"thresholds": "1e-4,2e-4"}, "bitfit", "thresholds"),
], ids=["budget-to-lora", "target-rank-to-adalora", "budget-to-full", "schedule-to-lora", "thresholds-to-bitfit"])
def test_a_saved_budget_or_schedule_config_trains_another_method_without_it(tmp_path, caplog, saved, method, field):
    # `sora train --config runs/sora1/config.yaml --method lora` failed: "a parameter budget needs method sora or
    # adalora, got 'lora'" (and `--target-rank none`, a flag lora does not use, is refused).
    from soralib.train.config import build_config, save_yaml

    path = tmp_path / "config.yaml"
    save_yaml(build_config("sora", None, {"task": "rte", "model": "m", "output_dir": "o", **saved}), path)
    value = build_config("sora", str(path), {})  # the saved value, as the run used it
    with caplog.at_level("WARNING"):
        config = build_config(method, str(path), {"output_dir": "o2"})
    assert config.method == method and getattr(config, field) is None  # the method's default, saved as such
    reason = "with method sora" if field in ("target_rank", "schedule", "thresholds") else "with method sora or adalora"
    assert f"{path}: {field}={getattr(value, field)!r} is ignored: it is used only {reason}" in caplog.text
    # the same value as a flag stays an error (the method's own words: "a parameter budget needs method sora or
    # adalora, got 'lora'", "adalora takes its budget as target_params or adalora_target_r, not target_rank")
    with pytest.raises(InputError):
        build_config(method, str(path), {"output_dir": "o2", field: saved[field]})


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
    ("float-rank.yaml", "r: 1.5\n", "r must be an integer, got 1.5"),
    ("empty-lr.yaml", "lr:\n", "lr must be a number, got null (an empty value)"),
    ("null-rank.yaml", "r: null\n", "r must be an integer, got null (an empty value)"),
], ids=["missing", "invalid-yaml", "not-a-mapping", "unknown-field", "bad-value", "empty-value", "null-value"])
def test_bad_yaml_config_files_exit_2_and_write_nothing(glue_dir, tiny_model, tmp_path, capsys, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--config", path), expected.format(path=path), out)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--bogus"], "sora train: error: unrecognized arguments: --bogus"),
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
