"""bench/quality.py, the quality matrix: its plan (--dry-run, unknown tasks), the --jobs scheduler and AdaLoRA's
wait for its sora cell, --start-within, and the validation curve read from a run's history. Fake cell runners:
nothing is trained."""

import json
import os

import pytest

from bench import common, quality
from bench_helpers import _quality_record


def test_quality_refuses_an_unknown_task_and_points_sft_to_bench_sft(capsys):
    with pytest.raises(SystemExit):
        quality.parse(["--tasks", "mrpc,gsm8k"])
    err = capsys.readouterr().err
    assert "unknown task(s) ['gsm8k']" in err and "python -m bench.sft" in err


def test_quality_dry_run_skips_finished_cells(tmp_path, capsys):
    results, runs = tmp_path / "quality.jsonl", tmp_path / "runs"
    argv = ["--lr-search", "family", "--dry-run", "--tasks", "rte", "--seeds", "0,1", "--methods", "lora,sora,adalora", "--results",
            str(results), "--runs-dir", str(runs)]
    assert quality.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("run   ") == 6 and "skip  " not in first
    assert first.index("rte-sora-s0") < first.index("rte-adalora-s0")  # sora first: it sets AdaLoRA's budget
    assert "run   rte-adalora-s0-e20: once rte-sora-s0-e20 is done, at its final size, lr shipped" in first
    assert "--protocol paper" in first
    assert not results.exists() and not runs.exists()  # a dry run writes nothing
    common.append_jsonl(results, _quality_record("rte", "sora", 0, 0.6, kept=1000))
    assert quality.main(argv) == 0
    second = capsys.readouterr().out
    assert "skip  rte-sora-s0-e20 (done)" in second and second.count("run   ") == 5
    adalora = next(line for line in second.splitlines() if "rte-adalora-s0" in line)
    assert "--target-params 1000" in adalora  # the matching sora cell's final size


def test_quality_jobs_run_cells_side_by_side_and_adalora_waits_for_its_sora_cell(tmp_path, monkeypatch, capsys):
    import threading
    import time

    events, lock, running, most = [], threading.Lock(), [0], [0]

    def fake_run_cell(cell, args, records):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            events.append(("start", cell.key, cell.threads, cell.budget_from in records))
        time.sleep(0.3 if cell.variant == "sora" else 0.05)  # sora is slow: AdaLoRA must wait for it anyway
        with lock:
            running[0] -= 1
        return {"key": cell.key, "metrics": {"main_metric": "accuracy", "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    results = tmp_path / "quality.jsonl"
    argv = ["--lr-search", "family", "--tasks", "rte", "--seeds", "0", "--methods", "sora,lora,adalora,full", "--jobs", "2", "--results",
            str(results), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    assert most[0] == 2  # two cells at a time
    started = {key: (threads, sora_done) for _, key, threads, sora_done in events}
    assert set(started) == {f"rte-{v}-s0-e20-j2" for v in ("sora", "lora", "adalora", "full")}
    assert all(threads == max(1, (os.cpu_count() or 1) // 2) for threads, _ in started.values())
    assert started["rte-adalora-s0-e20-j2"][1] is True  # it started only once the sora cell's record existed
    assert [r["key"] for r in common.read_jsonl(results)][0] != "rte-adalora-s0-e20-j2"
    assert len(common.read_jsonl(results)) == 4


def test_quality_never_runs_adalora_without_its_sora_cells_result(tmp_path, monkeypatch, capsys):
    started = []

    def fake_run_cell(cell, args, records):
        started.append(cell.key)
        if cell.variant == "sora":
            return None  # the sora cell fails: no final size to give AdaLoRA
        return {"key": cell.key, "metrics": {"main_metric": "accuracy", "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    argv = ["--lr-search", "family", "--tasks", "rte", "--seeds", "0", "--methods", "sora,lora,adalora", "--results",
            str(tmp_path / "quality.jsonl"), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 1
    assert started == ["rte-sora-s0-e20", "rte-lora-s0-e20"]
    assert "FAIL  rte-adalora-s0-e20: its budget comes from rte-sora-s0-e20, which has no result" in \
        capsys.readouterr().out
    argv = ["--lr-search", "family", "--tasks", "rte", "--seeds", "0", "--methods", "adalora", "--results", str(tmp_path / "quality.jsonl"),
            "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 1 and len(started) == 2  # asked for AdaLoRA alone: nothing runs, and it says so
    assert quality.main(argv + ["--dry-run"]) == 0
    assert "run   rte-adalora-s0-e20: once rte-sora-s0-e20 is done, at its final size, lr shipped" in \
        capsys.readouterr().out


def test_quality_curve_counts_training_steps_across_scheduler_stages(tmp_path):
    history = tmp_path / "history.jsonl"
    lines = [{"step": 10, "stage": 1, "elapsed_seconds": 1.0, "loss": 0.5},
             {"step": 50, "stage": 1, "elapsed_seconds": 5.0, "eval_f1": 0.6, "split": "validation"},
             {"step": 50, "stage": 1, "elapsed_seconds": 5.0, "train_runtime": 5.0},
             {"step": 50, "stage": 2, "elapsed_seconds": 9.0, "eval_f1": 0.7, "split": "validation"},
             {"step": 40, "stage": 3, "elapsed_seconds": 12.0, "eval_f1": 0.8, "split": "validation"}]
    history.write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve, _ = quality.validation_curve(history, "f1")
    assert curve == [[5.0, 0.6, 50], [9.0, 0.7, 100], [12.0, 0.8, 140]]
    # a run resumed from its step-40 checkpoint of stage 3 logged steps 40.. again: the newest lines count
    resumed = lines + [{"step": 40, "stage": 3, "elapsed_seconds": 12.5, "eval_f1": 0.9, "split": "validation"}]
    history.write_text("".join(json.dumps(x) + "\n" for x in resumed))
    assert quality.validation_curve(history, "f1")[0] == [[5.0, 0.6, 50], [9.0, 0.7, 100], [12.5, 0.9, 140]]


def test_quality_starts_no_cell_after_its_time_is_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "run_cell", lambda *a: (_ for _ in ()).throw(AssertionError("a cell started")))
    results = tmp_path / "quality.jsonl"
    argv = ["--lr-search", "family", "--tasks", "rte", "--seeds", "0", "--methods", "sora,lora", "--start-within", "0", "--results",
            str(results), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    assert "2 cell(s) left for the next run" in capsys.readouterr().out and not results.exists()
