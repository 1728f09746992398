"""The `sora` parser: instant help that imports no torch/peft/transformers, every flag explained, no
abbreviations, negative numbers as values, --flag/--no-flag booleans. Rejections are in test_rejections_*.py."""

import subprocess
import sys

import pytest

from soralib.cli import build_parser, main, train_config

HEAVY = ("torch", "peft", "transformers")
REQUIRED = ["--task", "rte", "--model", "m", "--output-dir", "o"]

# Runs the CLI the way `python -m soralib.cli ARGS` and the `sora` console script do, in a fresh
# interpreter, then prints which heavy modules got imported.
PROBE = """
import runpy, sys
sys.argv = ["sora", *sys.argv[1:]]
try:
    if {as_module}:
        runpy.run_module("soralib.cli", run_name="__main__")
    else:
        from soralib.cli import main
        sys.exit(main())
except SystemExit as stop:
    code = stop.code
print("EXIT", code, "HEAVY", sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("as_module, argv", [
    (True, ["--help"]), (True, ["train", "--help"]), (False, ["train", "--help"]), (False, ["bench", "--help"]),
    (False, ["export", "--help"]), (False, ["train", "--bogus"]),
], ids=["python-m", "python-m-train", "train", "bench", "export", "usage-error"])
def test_help_and_usage_errors_import_no_torch_peft_or_transformers(as_module, argv):
    probe = PROBE.format(as_module=as_module, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    expected_exit = 2 if "--bogus" in argv else 0
    assert result.stdout.splitlines()[-1] == f"EXIT {expected_exit} HEAVY []", result.stdout + result.stderr


def test_import_soralib_then_peft_still_registers_sora_at_first_use():
    code = ("import soralib, soralib.export, peft; from torch import nn\n"
            "print(callable(soralib.prune))\n"  # the function, not the submodule soralib.export imported
            "model = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), soralib.SoraConfig(r=2, target_modules=['0']))\n"
            "from soralib import SoraConfig, create_sora_optimizer, prune\n"
            "print(type(model.base_model).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "SoraModel"], result.stderr


def test_import_soralib_after_peft_registers_sora_at_once():
    import importlib

    import peft

    import soralib

    soralib.register()
    for mapping in (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING):
        mapping.pop("SORA")
    try:
        importlib.reload(soralib)  # peft is imported already, as it is here
        assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["SORA"] is soralib.config.SoraConfig
    finally:
        soralib.register()


def train_help(capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


@pytest.mark.parametrize("shown", [
    "--method {sora,lora,adalora,full,bitfit}", "--task {cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,custom,sft}",
    "--protocol {default,paper}", "--schedule {linear,log_linear,exp_linear}", "--threshold-mode {fixed,lr_scaled}",
    "--gate-init {randn,ones}", "--layout {exact,uniform}",
    "(default: 0.0003) Used only with method sora, without --schedule",  # threshold
    "(default: 0.0008; full: 2e-05, bitfit: 0.001)",  # lr: each method's YAML
    "(default: 8) Used only with method sora, lora or adalora, without --lora-config",  # r
    "--group-by-length [BOOL]", "--no-group-by-length same as --group-by-length false",
    "Used only with task custom.", "(required)",
])
def test_train_help_shows_each_flags_choices_default_and_when_it_is_used(capsys, shown):
    assert shown in train_help(capsys)


def test_every_config_flag_states_its_default(capsys):
    from soralib.train.config import FIELDS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    blocks = capsys.readouterr().out.split("\n  --")[1:]  # one block per option, wrapped lines included
    helps = {block.split()[0]: " ".join(block.split()) for block in blocks}
    for name in FIELDS:
        text = helps[name.replace("_", "-")]
        assert "(default: " in text or "(required)" in text, text


@pytest.mark.parametrize("command", ["report", "eval", "export"])
def test_run_dir_is_described_in_help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "RUN_DIR a run directory written by `sora train --output-dir`" in " ".join(capsys.readouterr().out.split())


def test_sora_bench_help_lists_the_tools(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "{speed,quality,tables}" in out and "sora bench TOOL -h" in " ".join(out.split())


@pytest.mark.parametrize("argv, unknown", [
    (["train", "--over"], "--over"),
    (["train", "--res"], "--res"),
    (["train", "--thresh", "1"], "--thresh"),
    (["eval", "run", "--data", "d"], "--data"),
    (["export", "run", "--lay", "exact"], "--lay"),
], ids=["over", "res", "thresh", "eval-data", "export-lay"])
def test_abbreviated_flags_are_refused(capsys, argv, unknown):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--eval-steps", "100"], "sora train: error: unrecognized arguments: --eval-steps 100; did you mean "
                                       "--eval-fraction (a fraction of the steps: 0.1 evaluates every 10 %)?"),
    (["train", "--learning-rate", "1e-4"], "sora train: error: unrecognized arguments: --learning-rate 1e-4; did you "
                                           "mean --lr?"),
    (["train", "--over"], "sora train: error: unrecognized arguments: --over; did you mean --overwrite?"),
    (["train", "--gate-initt", "ones"], "sora train: error: unrecognized arguments: --gate-initt ones; did you mean "
                                        "--gate-init?"),
    (["ranks", "run", "--output", "x"], "sora ranks: error: unrecognized arguments: --output x; did you mean --out?"),
    (["train", "--learning_rate", "1e-4"], "sora train: error: unrecognized arguments: --learning_rate 1e-4; did "
                                           "you mean --lr?"),
    (["train", "--bogus"], "sora train: error: unrecognized arguments: --bogus"),
    (["train", "--report-to", "none"], "sora train: error: unrecognized arguments: --report-to none"),
], ids=["trainer-name", "trainer-lr", "abbreviated", "misspelt", "longer", "underscores", "nothing-near",
        "not-a-short-flag-plus-anything"])
def test_an_unknown_flag_names_the_flag_it_most_likely_meant(capsys, argv, expected):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == expected


@pytest.mark.parametrize("flags, field, value", [
    (["--group-by-length"], "group_by_length", True),
    (["--no-group-by-length"], "group_by_length", False),
    (["--group-by-length", "false"], "group_by_length", False),
    (["--eval-each-epoch"], "eval_each_epoch", True),
    (["--eval-each-epoch", "true"], "eval_each_epoch", True),
    (["--no-eval-each-epoch"], "eval_each_epoch", False),
    ([], "group_by_length", True),
], ids=["flag", "no-flag", "flag-false", "eval-flag", "eval-true", "eval-no-flag", "unset"])
def test_boolean_flags_take_the_no_form_or_an_explicit_value(flags, field, value):
    args = build_parser().parse_args(["train", *REQUIRED, *flags])
    assert getattr(train_config(args), field) is value


@pytest.mark.parametrize("flags, field", [
    (["--lr", "-1e-3"], "lr"),
    (["--gate-lr", "-inf"], "gate_lr"),
    (["--seed", "-3"], "seed"),
    (["--thresholds", "-0.1,0.2"], "thresholds"),
    (["--weight-decay", "-.5"], "weight_decay"),
], ids=["exponent", "inf", "int", "list", "leading-dot"])
def test_a_number_flag_takes_a_negative_value(flags, field):
    from soralib.cli import _negative_values_attached

    args = build_parser().parse_args(_negative_values_attached(["train", *REQUIRED, *flags]))
    assert getattr(args, field) == flags[1]


def test_a_negative_looking_token_after_a_text_flag_is_not_taken_as_its_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--output-dir", "-1e-3"])
    assert "argument --output-dir: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("rank, speaks", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_result_lines(monkeypatch, capsys, rank, speaks):
    import soralib.train.run

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(soralib.train.run, "train", lambda config, **kw: {"task": "rte", "method": "lora"})
    assert main(["train", "--method", "lora", *REQUIRED]) == 0
    out = capsys.readouterr().out
    assert ("metrics.json" in out) == speaks, out


def test_a_path_the_user_may_not_write_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    # as root in CI no chmod refuses a write: the library call raises what a user's read-only directory would
    import soralib.report

    def refused(run_dir):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "report"))

    monkeypatch.setattr(soralib.report, "write_report", refused)
    assert main(["report", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == f"sora report: error: Permission denied: {tmp_path / 'run' / 'report'}\n"
