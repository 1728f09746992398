"""`sora train`'s sparsity controls end to end: the sparsifying scheduler's stages, and a parameter or mean-rank
budget that lands on its target."""

import json
import logging

import pytest

from conftest import train_args
from soralib.cli import main

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


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


@pytest.mark.parametrize("flags", [["--thresholds", "0.05"], ["--schedule", "linear", "--num-stages", "1"]],
                         ids=["thresholds", "schedule"])
def test_a_one_stage_schedule_measures_and_saves_its_stage_like_any_other(glue_dir, tiny_model, tmp_path, flags):
    # it wrote no stages.jsonl, no stage adapter and no memorization, though --memorization-samples was accepted
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, *flags, "--memorization-samples", "8", "--max-steps", "2")) == 0
    [stage] = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert stage["stage"] == 1 and {"generalization", "memorization"} <= set(stage)
    assert (out / stage["checkpoint"] / "adapter" / "adapter_config.json").is_file()


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


@pytest.mark.parametrize("flags", [[], ["--budget-ramp", "trim", "--gate-init", "ones"]], ids=["threshold", "trim"])
def test_target_rank_budget_lands_on_the_mean_kept_rank(glue_dir, tiny_model, tmp_path, flags):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--target-rank", "3", "--epochs", "3", *flags)) == 0
    sparsity = json.loads((out / "sparsity.json").read_text())
    mean_rank = sparsity["kept_rank"] / len(sparsity["modules"])
    assert abs(mean_rank - 3) <= 0.05 * 3


def test_an_lr_scaled_threshold_that_would_prune_nothing_is_warned_about(glue_dir, tiny_model, tmp_path, caplog):
    # the fixed mode's default 3e-4 read as λ: τ = λ·lr ≈ 2e-7 a step
    with caplog.at_level(logging.WARNING, logger="soralib.train.methods.sora"):
        assert main(train_args(glue_dir, tiny_model, tmp_path / "run", "--threshold-mode", "lr_scaled",
                               "--max-steps", "4")) == 0
    assert any("--threshold-mode lr_scaled reads --threshold 0.0003 as λ" in m and "prunes almost nothing" in m
               for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soralib.train.methods.sora"):
        assert main(train_args(glue_dir, tiny_model, tmp_path / "big", "--threshold-mode", "lr_scaled",
                               "--threshold", "5000", "--max-steps", "4")) == 0
    assert not any("prunes almost nothing" in m for m in caplog.messages)
