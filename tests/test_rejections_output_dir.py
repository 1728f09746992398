"""The rows of docs/errors.md for `sora train`'s output directory: required, not a file, and --resume of a directory
that holds no run, a run with other settings or a broken config.yaml; what is already there is kept."""

import json
import logging

import pytest

from conftest import train_args
from rejection_helpers import _write, fails_cleanly
from soralib.cli import main
from soralib.train.config import build_config, save_yaml

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


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


def test_resume_with_the_value_an_unset_gate_setting_stands_for_continues(glue_dir, tiny_model, tmp_path, capsys):
    # a budget run saved with min_rank null (1 with a budget) and gate_lr null (the lr): naming those values is no
    # change ("min_rank: saved None, given 1" refused the run's own settings); another value still is
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out, target_rank="4", max_steps="1")
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--min-rank", "2", "--gate-lr", "1e-3", "--resume"),
                  f"cannot resume {out} with other settings (gate_lr: saved None, given 0.001; min_rank: saved None, "
                  "given 2)")
    same = ["--target-rank", "4", "--min-rank", "1", "--gate-lr", "8e-4", "--max-steps", "1", "--resume"]
    assert main(train_args(glue_dir, tiny_model, out, *same)) == 0
    assert (out / "config.yaml").read_text() == saved


def test_resume_with_only_the_output_dir_continues_with_the_saved_settings(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out, lr="1e-3", r="4", max_steps="1")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert (out / "config.yaml").read_text() == saved
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_bare_resume_of_a_run_saved_with_its_own_max_length_continues_with_it(glue_dir, tiny_model, tmp_path):
    # what Ctrl-C prints: max_length, which validation fills in (128 without a task), is no flag of the user's
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out, max_length="64", max_steps="1")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert (out / "config.yaml").read_text() == saved and "max_length: 64\n" in saved
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_resume_with_another_max_length_than_the_saved_run_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    saved = _saved_run(glue_dir, tiny_model, out, max_length="64")
    fails_cleanly(capsys, ["train", "--output-dir", out, "--max-length", "32", "--resume"],
                  f"cannot resume {out} with other settings (max_length: saved 64, given 32): "
                  "drop these flags to resume it, or start a new run in another --output-dir")
    assert [p.name for p in out.iterdir()] == ["config.yaml"] and (out / "config.yaml").read_text() == saved


@pytest.mark.parametrize("files, expected", [
    ({"config.yaml": "r: [1\n"}, "{out}/config.yaml: not valid YAML (while parsing a flow sequence)"),
    ({"config.yaml": "rank: 4\n"}, "{out}/config.yaml: unknown config field(s) rank; see `sora train --help`"),
    ({"config.yaml": "r: many\n"}, "r must be an integer, got 'many'"),
], ids=["invalid-yaml", "unknown-field", "bad-value"])
def test_resume_of_a_run_whose_config_yaml_is_broken_is_refused_and_kept(glue_dir, tiny_model, tmp_path, capsys, files,
                                                                          expected):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in files.items():
        _write(out / name, text)
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--resume"), expected.format(out=out))
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
