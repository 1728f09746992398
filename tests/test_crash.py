"""SIGKILL a real training process at several moments: files are complete or absent, and --resume finishes
the run with exactly the uninterrupted run's result."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import history_lines, train_args
from rejection_helpers import fails_cleanly
from soralib.cli import main
from soralib.train import checkpoints
from soralib.train.checkpoints import latest_checkpoint

COMMON = ["--max-steps", "24", "--save-steps", "4", "--batch-size", "4",
          "--schedule", "linear", "--schedule-start", "0.002", "--schedule-end", "0.01", "--num-stages", "2"]


def _torn_checkpoints(run: Path) -> list[Path]:
    """Checkpoints a save began and did not finish: Trainer writes in place, the COMPLETE marker comes last."""
    return [p for p in run.glob("checkpoints/*/checkpoint-*") if p.is_dir() and not (p / "COMPLETE").exists()]


# When to kill, as a condition polled every millisecond on the run directory.
MOMENTS = {
    "during_first_steps": lambda run: (run / "history.jsonl").exists(),
    "while_writing_a_checkpoint": lambda run: bool(_torn_checkpoints(run)),
    "right_after_a_checkpoint": lambda run: any(run.glob("checkpoints/*/checkpoint-*/COMPLETE")),
    "in_the_second_stage": lambda run: any(run.glob("checkpoints/stage-2/checkpoint-*/COMPLETE")),
}


def assert_every_visible_file_is_complete(run: Path, torn_allowed: bool = False) -> None:
    """Each file under a non-hidden path parses in full; hidden names are temporaries by design, and so is a
    torn checkpoint (no COMPLETE marker: never resumed), of which a killed run leaves at most one per stage."""
    torn = _torn_checkpoints(run)
    assert len(torn) <= torn_allowed, f"torn checkpoints left: {torn}"
    for path in run.rglob("*"):
        rel = path.relative_to(run)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.parts[0] == "logs":
            continue  # TensorBoard event files are an append-only record format its readers tolerate torn
        if any(checkpoint in path.parents for checkpoint in torn):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix in (".pt", ".pth"):  # torch's zip format: every member's CRC must check out
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None, path


@pytest.fixture(scope="module")
def straight(glue_dir, tiny_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("straight") / "run"
    os.environ["SORALIB_CACHE"] = str(out.parent / "cache")
    assert main(train_args(glue_dir, tiny_model, out, *COMMON)) == 0
    return out


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_run_killed_at_any_moment_leaves_complete_files_and_resumes_to_the_same_result(
        glue_dir, tiny_model, straight, tmp_path, moment):  # noqa: F811
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "soralib.cli", *train_args(glue_dir, tiny_model, run, *COMMON)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    reached = False
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if MOMENTS[moment](run):
            reached = True
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, f"the run ended before the moment {moment!r} was seen"
    assert not (run / "metrics.json").exists()
    assert_every_visible_file_is_complete(run, torn_allowed=True)

    assert main(train_args(glue_dir, tiny_model, run, *COMMON, "--resume")) == 0
    assert_every_visible_file_is_complete(run)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert a["eval"] == b["eval"] and a["kept_params"] == b["kept_params"]
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    sa, sb = ((d / "stages.jsonl").read_text().splitlines() for d in (straight, run))
    assert [json.loads(x)["kept_params"] for x in sa] == [json.loads(x)["kept_params"] for x in sb]
    assert history_lines(run) == history_lines(straight)  # the steps redone after the checkpoint are logged once


def test_a_resumed_run_keeps_the_training_time_and_skipped_steps_counted_before_the_kill(glue_dir, tiny_model, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = ["--max-steps", "12", "--save-steps", "4", "--batch-size", "4", "--eval-each-epoch", "true"]
    cmd = [sys.executable, "-m", "soralib.cli", *train_args(glue_dir, tiny_model, run, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not MOMENTS["right_after_a_checkpoint"](run):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = latest_checkpoint(run / "checkpoints" / "stage-1")  # the one --resume picks (numeric order)
    assert resumed_from and not (run / "metrics.json").exists()
    clock = Path(resumed_from) / "training_seconds.json"
    assert json.loads(clock.read_text())["training_seconds"] > 0
    # Pretend the run had trained for 1000 s and skipped 5 non-finite steps before the kill: both go on from there.
    clock.write_text(json.dumps({"training_seconds": 1000.0, "skipped_steps": 5}))
    assert main(train_args(glue_dir, tiny_model, run, *args, "--resume")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 1000.0 < metrics["train_seconds"] < 1000.0 + 180 and metrics["skipped_steps"] == 5
    last = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()][-1]
    assert last["elapsed_seconds"] > 1000.0


EVERY_STEP = ["--max-train-samples", "16", "--save-steps", "1", "--logging-steps", "1"]  # 2 epochs of 2 steps


@pytest.fixture(scope="module")
def every_checkpoint(glue_dir, tiny_model, tmp_path_factory):  # noqa: F811
    """A straight length-grouped run (the default) that keeps its checkpoint of every step."""
    out = tmp_path_factory.mktemp("every-step") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORALIB_CACHE", str(out.parent / "cache"))
        patch.setattr(checkpoints, "KEEP", 100)
        assert main(train_args(glue_dir, tiny_model, out, *EVERY_STEP)) == 0
    assert len(list(out.glob("checkpoints/stage-1/checkpoint-*"))) == 4
    return out


def _step_lines(run: Path) -> dict[int, dict]:
    """history.jsonl's per-step lines without the wall-clock time."""
    lines = (json.loads(x) for x in (run / "history.jsonl").read_text().splitlines())
    return {x["step"]: {k: v for k, v in x.items() if k != "elapsed_seconds"} for x in lines if "loss" in x}


@pytest.mark.parametrize("step", range(1, 5))
def test_a_run_resumed_from_any_checkpoint_goes_on_bitwise_like_the_straight_run(
        glue_dir, tiny_model, every_checkpoint, tmp_path, monkeypatch, step):  # noqa: F811
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    name = f"checkpoints/stage-1/checkpoint-{step}"
    shutil.copytree(every_checkpoint / name, run / name)
    shutil.copy(every_checkpoint / "config.yaml", run / "config.yaml")
    shutil.copy(every_checkpoint / "history.jsonl", run / "history.jsonl")  # as if killed after logging the last step
    assert main(train_args(glue_dir, tiny_model, run, *EVERY_STEP, "--resume")) == 0
    assert _step_lines(run) == _step_lines(every_checkpoint)  # bitwise the same losses, each step logged once
    assert history_lines(run) == history_lines(every_checkpoint)
    ta, tb = (load_file(str(d / "sora_adapter" / "adapter_model.safetensors")) for d in (every_checkpoint, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_checkpoint_torn_by_a_kill_inside_the_save_is_not_resumed_and_is_gone_after_the_resumed_run(
        glue_dir, tiny_model, every_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    run, save = tmp_path / "run", torch.save
    stage = run / "checkpoints" / "stage-1"

    def killed_before_the_rng_state_of_checkpoint_3(obj, f, *args, **kwargs):
        # Trainer has written checkpoint-3's adapter, optimizer and scheduler by now, not yet its RNG state.
        if Path(f).parent.name == "checkpoint-3" and Path(f).name.startswith("rng_state"):
            raise KeyboardInterrupt
        return save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed_before_the_rng_state_of_checkpoint_3)
        assert main(train_args(glue_dir, tiny_model, run, *EVERY_STEP)) == 130
    assert (stage / "checkpoint-3" / "optimizer.pt").is_file() and _torn_checkpoints(run) == [stage / "checkpoint-3"]
    assert latest_checkpoint(stage) == str(stage / "checkpoint-2")

    stale = []

    def rewritten(obj, f, *args, **kwargs):  # the resumed run writes checkpoint-3 afresh, not into the torn one
        if Path(f).name == "optimizer.pt" and Path(f).parent.name == "checkpoint-3":
            stale.append(Path(f).exists())
        return save(obj, f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", rewritten)
        assert main(train_args(glue_dir, tiny_model, run, *EVERY_STEP, "--resume")) == 0
    assert stale == [False]
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoint-3", "checkpoint-4"]  # KEEP = 2, both complete
    assert_every_visible_file_is_complete(run)
    assert _step_lines(run) == _step_lines(every_checkpoint)  # steps 3 and 4 logged again: the same bits
    assert history_lines(run) == history_lines(every_checkpoint)  # step 3, logged before the torn save, only once
    ta, tb = (load_file(str(d / "sora_adapter" / "adapter_model.safetensors")) for d in (every_checkpoint, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_ctrl_c_exits_130_with_one_line_naming_the_checkpoint_and_its_command_resumes(glue_dir, tiny_model, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # --max-length other than the default: the printed command must resume whatever the run's settings
    cmd = [sys.executable, "-m", "soralib.cli", *train_args(glue_dir, tiny_model, run, "--max-steps", "12",
                                                            "--save-steps", "2", "--batch-size", "4",
                                                            "--max-length", "64")]
    # SIGINT back to its default in the child: a shell that starts the suite in the background (`... &`) makes
    # its children ignore SIGINT, and Python installs its KeyboardInterrupt handler only where it is not ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not MOMENTS["right_after_a_checkpoint"](run):
        time.sleep(0.001)
    assert proc.poll() is None, "the run ended before its first checkpoint was seen"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert not (run / "metrics.json").exists() and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("sora train: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-3000:]
    checkpoint = lines[0].rsplit(" continues from ", 1)[1]
    assert checkpoint == latest_checkpoint(run / "checkpoints" / "stage-1")
    command = f"`sora train --output-dir {run} --resume`"
    assert lines[0] == f"sora train: interrupted; {command} continues from {checkpoint}"
    assert main(command.strip("`").split()[1:]) == 0 and (run / "metrics.json").is_file()


# AdaLoRA over 40 steps (rte's 48 rows, 4 a batch): tinit 4, an allocation every step (deltaT 1) up to the final
# one at step 32 (total_step − tfinal), then masking only
ADALORA = ["--method", "adalora", "--max-steps", "40", "--batch-size", "4", "--save-steps", "1",
           "--logging-steps", "1", "--target-params", "1000"]


@pytest.fixture(scope="module")
def adalora_every_checkpoint(glue_dir, tiny_model, tmp_path_factory):
    """A straight AdaLoRA run that keeps its checkpoint of every step."""
    out = tmp_path_factory.mktemp("adalora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORALIB_CACHE", str(out.parent / "cache"))
        patch.setattr(checkpoints, "KEEP", 100)
        assert main(train_args(glue_dir, tiny_model, out, *ADALORA)) == 0
    return out


def _copy_checkpoint(straight: Path, run: Path, step: int) -> Path:
    """`run` as the straight run was when killed right after its checkpoint of `step` (its log runs on)."""
    name = f"checkpoints/stage-1/checkpoint-{step}"
    shutil.copytree(straight / name, run / name)
    for file in ("config.yaml", "history.jsonl"):
        shutil.copy(straight / file, run / file)
    return run / name


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".sora.lock"}


# Resumed before AdaLoRA allocates, while it does (its checkpoints had lost the pruned ranks: size mismatch on
# load), after its final allocation (the same, and the masking needs the rank pattern). The importance scores'
# moving averages are in the checkpoint too: without them the first allocations after a resume differ.
@pytest.mark.parametrize("step", [3, 10, 33])
def test_an_adalora_run_resumed_from_any_checkpoint_goes_on_bitwise_like_the_straight_run(
        glue_dir, tiny_model, adalora_every_checkpoint, tmp_path, monkeypatch, step):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    straight, run = adalora_every_checkpoint, tmp_path / "run"
    _copy_checkpoint(straight, run, step)
    assert main(train_args(glue_dir, tiny_model, run, *ADALORA, "--resume")) == 0
    assert _step_lines(run) == _step_lines(straight)  # bitwise the same losses and gradient norms
    assert history_lines(run) == history_lines(straight)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert a["eval"] == b["eval"] and a["kept_params"] == b["kept_params"]
    ta, tb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_an_adalora_checkpoint_an_older_soralib_cut_to_its_ranks_is_refused_and_kept(
        glue_dir, tiny_model, adalora_every_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    checkpoint = _copy_checkpoint(adalora_every_checkpoint, run, 10)
    # What older versions wrote: PEFT's adapter_config.json with the rank pattern the adapter was cut to
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["rank_pattern"] = torch.load(checkpoint / "adalora_allocator.pt", weights_only=True)["rank_pattern"]
    (checkpoint / "adapter_config.json").write_text(json.dumps(config))
    before = _files(run)
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, run, *ADALORA, "--resume"),
                  f"cannot resume from {checkpoint}: an older soralib saved it with AdaLoRA's adapter cut down to the "
                  "ranks it kept, and training goes on with the pruned ones too; start the run again with --overwrite")
    assert _files(run) == before  # the checkpoint is kept, and the log not rewound


def test_an_adalora_checkpoint_without_its_allocation_resumes_with_a_warning(
        glue_dir, tiny_model, adalora_every_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    checkpoint = _copy_checkpoint(adalora_every_checkpoint, run, 3)
    (checkpoint / "adalora_allocator.pt").unlink()  # an older soralib's, saved before the first allocation
    with caplog.at_level(logging.WARNING, logger="soralib.train.allocator"):
        assert main(train_args(glue_dir, tiny_model, run, *ADALORA, "--resume")) == 0
    assert (f"{checkpoint} has no AdaLoRA allocation (saved by an older soralib): the importance scores start "
            "again from zero, so the run does not go on exactly as it would have") in caplog.messages
