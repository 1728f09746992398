"""What `sora train` refuses end to end: bad flags, a missing model or data directory, labels outside the task,
an occupied output directory, a finished run to resume, DeepSpeed configs it cannot honour (exit 2, one line,
nothing written), and a run whose steps stay non-finite (exit 1, weights finite)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import train_args
from soralib.cli import main

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


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
    (["--lr", "fast"], "lr must be a number, got 'fast'"),
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
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out), f"output directory {out} is not empty and holds "
                   "no soralib run (no config.yaml); choose another --output-dir")  # no flag would help
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--overwrite"), "not a soralib run directory")
    assert (out / "notes.txt").read_text() == "mine"
    run = tmp_path / "a-run"
    run.mkdir()
    (run / "config.yaml").write_text("task: rte\n")  # a run (killed early): both flags are ways on
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, run), f"output directory {run} is not empty; pass "
                   "--overwrite to replace it or --resume")


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


def test_resuming_a_finished_run_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "2")) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    _fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--resume"), "is finished (metrics.json exists)")
    assert (out / "metrics.json").read_bytes() == before
