"""`sora train --overwrite` deletes only what a run wrote; one `sora train` writes a directory at a time; a
full disk is one line, and --resume (or a new start) carries on from what was left."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soralib.train.run as run_module
from conftest import train_args
from soralib.cli import main
from soralib.train.config import build_config, save_yaml
from soralib.train.checkpoints import latest_checkpoint
from soralib.train import rundir
from soralib.train.rundir import LOCK, foreign

STEPS = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "4"]
QUICK = [*STEPS, "--threshold", "0.01"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path_factory.getbasetemp() / "rundir-cache"))


@pytest.fixture(scope="module")
def finished(glue_dir, tiny_model, tmp_path_factory):  # noqa: F811
    """A finished two-stage SoRA run holding everything soralib writes into one: stages, `sora export`, report."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORALIB_CACHE", str(tmp_path_factory.getbasetemp() / "rundir-cache"))
        assert main(train_args(glue_dir, tiny_model, out, *STEPS, "--schedule", "linear", "--schedule-start", "0.002",
                               "--schedule-end", "0.01", "--num-stages", "2")) == 0
        assert main(["export", str(out)]) == 0 and main(["report", str(out)]) == 0
    return out


def _copy(run, to):
    shutil.copytree(run, to, symlinks=True)
    return to


def _listing(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
                  for p in root.rglob("*"))


def _error(capsys):
    """The one error line, last on stderr, with no traceback. A progress bar cut short by the error leaves no
    newline, so the message may follow the bar on its line (as it does for a diverged run)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("sora train: error: ") == 1, err
    line = err[err.index("sora train: error: "):]
    assert line.endswith("\n") and line.count("\n") == 1, err
    return line.rstrip("\n")


@contextlib.contextmanager
def held_lock(directory):
    """Another process holding `directory`'s lock, as a running `sora train` does; yields its pid."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); "
            "print('locked', flush=True); "
            "time.sleep(300)")
    directory.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


# ---- --overwrite deletes only what a run wrote ---------------------------------------------------------------------

def test_a_finished_run_holds_nothing_a_run_does_not_write(finished):
    # rundir.RUN must list every name a run, `sora export` and `sora report` write, or --overwrite refuses them
    assert foreign(finished) == []
    assert (finished / LOCK).is_file() and (finished / "stages").is_dir() and (finished / "adapter-uniform").is_dir()


def test_every_top_level_key_of_metrics_json_is_named_in_rundir(finished):
    # eval, export, report and bench read metrics.json by rundir's names; a further dev set is keyed by its split
    named = {rundir.TASK, rundir.METHOD, rundir.SEED, rundir.MODEL, rundir.MAIN_METRIC, rundir.HIGHER_IS_BETTER,
             rundir.EVAL, rundir.TEST, rundir.KEPT_PARAMS, rundir.LORA_PARAMS_AT_R_MAX, rundir.EXPORTED_PARAMS,
             rundir.TRAIN_SECONDS, rundir.STEPS, rundir.SKIPPED_STEPS, rundir.NUM_LABELS, rundir.LABEL_NAMES,
             rundir.EVAL_ROWS}
    metrics = json.loads((finished / rundir.METRICS).read_text())
    assert set(metrics) <= named and {rundir.EVAL, rundir.EXPORTED_PARAMS, rundir.MAIN_METRIC} <= set(metrics)
    assert isinstance(metrics[rundir.EVAL][metrics[rundir.MAIN_METRIC]], float)
    # the same names read the stored bench results: none was renamed
    stored = Path(__file__).resolve().parents[1] / "bench" / "results" / "quality.jsonl"
    keys = {k for line in stored.read_text().splitlines() for k in json.loads(line)["metrics"]}
    assert {k for k in keys if not k.startswith(("test_", "validation_"))} <= named
    assert {rundir.EVAL, rundir.TEST, rundir.KEPT_PARAMS, rundir.TRAIN_SECONDS} <= keys


@pytest.mark.parametrize("mine, shown", [
    ("NOTES.txt", "NOTES.txt"),
    ("src/main.py", "src/"),
    ("adapter/NOTES.txt", "adapter/NOTES.txt"),
    ("sora_adapter/extra/x.bin", "sora_adapter/extra/"),
    ("model", "model"),  # a file where a run writes a directory
    ("stages/stage-1/adapter/card.md", "stages/stage-1/adapter/card.md"),
    ("checkpoints/stage-1/mine.txt", "checkpoints/stage-1/mine.txt"),
    ("logs/stage-1/notes.txt", "logs/stage-1/notes.txt"),
    ("report/notes.txt", "report/notes.txt"),
    ("adapter-uniform/notes.txt", "adapter-uniform/notes.txt"),
    ("adapter-mine/adapter_config.json", "adapter-mine/"),  # `sora export --out RUN/adapter-mine`: yours
    ("data@", "data@"),  # a symlink to your data
])
def test_overwrite_refuses_while_anything_a_run_does_not_write_is_in_the_run_and_keeps_it(
        glue_dir, tiny_model, finished, tmp_path, capsys, mine, shown):  # noqa: F811
    out = _copy(finished, tmp_path / "run")
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "train.csv").write_text("a,b\n")
    if mine.endswith("@"):
        (out / mine[:-1]).symlink_to(data)
    else:
        (out / mine).parent.mkdir(parents=True, exist_ok=True)
        (out / mine).write_text("mine")
    before = _listing(out)
    assert main(train_args(glue_dir, tiny_model, out, *QUICK, "--overwrite")) == 2
    assert _error(capsys) == (f"sora train: error: refusing to overwrite {out}: it holds {shown}, which a run does "
                              "not write; move them out first")
    assert _listing(out) == before and (data / "train.csv").read_text() == "a,b\n"


PROJECT = {"train.csv": "text,label\nhi,1\n", "src/main.py": "print('hi')\n"}


@pytest.mark.parametrize("config_yaml, expected", [
    ("name: my project\nepochs: 3\n", "it is not a soralib run directory (its config.yaml was not written by sora train)"),
    ("method: lora\nr: 4\n", "it is not a soralib run directory (its config.yaml was not written by sora train)"),
    (None, "it holds src/, train.csv, which a run does not write; move them out first"),  # sora train's own
], ids=["other-yaml", "a-sora-config-file", "a-run-config"])
@pytest.mark.parametrize("through", ["dir", "symlink"])
def test_overwrite_of_a_project_folder_is_refused_and_deletes_nothing(glue_dir, tiny_model, tmp_path, capsys,
                                                                       config_yaml, expected, through):  # noqa: F811
    project = tmp_path / "project"
    for name, text in PROJECT.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    if config_yaml is None:
        save_yaml(build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(project)}),
                  project / "config.yaml")
    else:
        (project / "config.yaml").write_text(config_yaml)
    out = project
    if through == "symlink":
        out = tmp_path / "link"
        out.symlink_to(project)
    before = _listing(project)
    assert main(train_args(glue_dir, tiny_model, out, *QUICK, "--overwrite")) == 2
    assert _error(capsys) == f"sora train: error: refusing to overwrite {out}: {expected}"
    assert _listing(project) == before


def test_overwrite_through_a_symlinked_output_dir_replaces_the_run_it_points_to(glue_dir, tiny_model, finished,
                                                                                 tmp_path, capsys):  # noqa: F811
    real = _copy(finished, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(train_args(glue_dir, tiny_model, link, *QUICK, "--overwrite")) == 0
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    # the new run has one stage: the old one's stages, export and report were its own, and are gone
    assert not any((real / name).exists() for name in ("stages", "stages.jsonl", "adapter-uniform", "report"))
    assert (real / "metrics.json").is_file() and foreign(real) == []
    assert (real / LOCK).read_text().strip() == str(os.getpid())


def test_a_dangling_symlink_as_output_dir_is_a_one_line_error(glue_dir, tiny_model, tmp_path, capsys):  # noqa: F811
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    assert main(train_args(glue_dir, tiny_model, link, *QUICK, "--overwrite")) == 2
    assert _error(capsys) == (f"sora train: error: output directory {link} is a symlink to {tmp_path / 'gone'}, "
                              "which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_resume_refuses_while_a_directory_the_run_rewrites_holds_other_files(glue_dir, tiny_model, finished, tmp_path,
                                                                            capsys):  # noqa: F811
    out = _copy(finished, tmp_path / "run")
    (out / "metrics.json").unlink()  # killed before its end, so resumable
    (out / "adapter" / "model-card.md").write_text("mine")
    assert main(train_args(glue_dir, tiny_model, out, "--resume")) == 2
    assert _error(capsys) == (f"sora train: error: cannot resume in {out}: it holds adapter/model-card.md, which a "
                              "run does not write; move them out first")
    assert (out / "adapter" / "model-card.md").read_text() == "mine"


# ---- one run per directory ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []], ids=["overwrite", "resume", "fresh"])
def test_a_second_train_on_a_directory_in_use_is_refused_naming_the_holders_pid(glue_dir, tiny_model, finished,
                                                                                tmp_path, capsys, flags):  # noqa: F811
    out = tmp_path / "run"
    if flags:
        _copy(finished, out)
        (out / "metrics.json").unlink()  # resumable
    with held_lock(out) as pid:
        before = _listing(out)
        assert main(train_args(glue_dir, tiny_model, out, *QUICK, *flags)) == 2
        assert _error(capsys) == (f"sora train: error: {out} is in use by another sora train (pid {pid}); wait for "
                                  "it to end or choose another --output-dir")
        assert _listing(out) == before


def test_a_run_that_takes_the_lock_after_the_first_check_still_stops_the_second(glue_dir, tiny_model, tmp_path,
                                                                                capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    monkeypatch.setattr(run_module, "lock_holder", lambda out: None)  # both passed the early check at once
    with held_lock(out) as pid:
        assert main(train_args(glue_dir, tiny_model, out, *QUICK)) == 2
        assert _error(capsys).endswith(f"is in use by another sora train (pid {pid}); wait for it to end or choose "
                                       "another --output-dir")
    assert [p.name for p in out.iterdir()] == [LOCK]


def test_a_lock_left_by_a_killed_process_blocks_nothing(glue_dir, tiny_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{_dead_pid()}\n")  # killed right after taking it: nothing else was written
    assert main(train_args(glue_dir, tiny_model, out, *QUICK)) == 0
    assert (out / "metrics.json").is_file() and (out / LOCK).read_text().strip() == str(os.getpid())


# ---- a full disk ----------------------------------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_is_one_line_and_resume_finishes_the_run(glue_dir, tiny_model, tmp_path,
                                                                                 capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    save = torch.save

    def full_at_step_4(obj, f, *args, **kwargs):  # torch.save on a full disk raises this, with no errno
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_at_step_4)
        patch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**10, 10**10 - 4096, 4096))
        assert main(train_args(glue_dir, tiny_model, out, *QUICK)) == 1
    assert _error(capsys) == f"sora train: error: no space left on device at {out}"
    assert latest_checkpoint(out / "checkpoints" / "stage-1").endswith("checkpoint-2")  # the torn one not resumed
    assert main(train_args(glue_dir, tiny_model, out, "--resume")) == 0
    assert (out / "metrics.json").is_file()


def test_a_full_disk_at_the_first_write_leaves_nothing_a_new_start_trips_on(glue_dir, tiny_model, tmp_path, capsys,
                                                                            monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    fsync = os.fsync

    def full(fd):  # every write into the run directory fails; the tokenization cache elsewhere still works
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out.resolve())):
            raise OSError(28, "No space left on device")
        fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        assert main(train_args(glue_dir, tiny_model, out, *QUICK)) == 1
    assert _error(capsys) == f"sora train: error: no space left on device at {out / 'state.json'}"
    assert [p.name for p in out.iterdir()] == [LOCK]
    assert main(train_args(glue_dir, tiny_model, out, *QUICK)) == 0
