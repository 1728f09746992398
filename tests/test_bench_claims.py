"""The claims of SoRA against LoRA: judged only with three seeds each, on deltas paired by seed (the tables of
bench/quality_tables.py), and the per-task protocol's claims with their confidence intervals (bench/claims.py)."""

import pytest

from bench import common, lr, quality, quality_tables, tables
from bench_helpers import _quality_record


def _three_mrpc_seeds(tmp_path, sora_kept):
    """LoRA (2000 parameters) and SoRA on MRPC, seeds 0-2, SoRA ahead by 2, 0 and 1 points."""
    results = tmp_path / "results"
    for seed, (lora, sora) in enumerate([(0.80, 0.82), (0.84, 0.84), (0.82, 0.83)]):
        common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "lora", seed, lora, kept=2000))
        common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "sora", seed, sora, kept=sora_kept))
    return results


def test_claims_are_judged_only_once_sora_and_lora_both_have_three_seeds(tmp_path):
    results = _three_mrpc_seeds(tmp_path, sora_kept=1600)
    common.append_jsonl(results / "quality.jsonl", _quality_record("rte", "lora", 0, 0.6, kept=2000))
    common.append_jsonl(results / "quality.jsonl", _quality_record("rte", "sora", 0, 0.7, kept=1000))
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    # mean delta +1.00 (met), 80 % of LoRA's parameters (missed), no validation curve (not measured)
    assert "| mrpc | sora | 3 | +1.00 met | 80.0 % missed | – |" in text
    assert "| rte | sora | 1 (not judged) | +10.00 | 50.0 % | – |" in text  # better and smaller, yet one seed


def test_claims_use_the_deltas_paired_by_seed_and_a_seed_trained_twice_counts_once(tmp_path):
    results = _three_mrpc_seeds(tmp_path, sora_kept=1000)
    # LoRA's seed 3 has no SoRA partner: a difference of means would read -4.00, the paired mean is +1.00
    common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "lora", 3, 0.99, kept=2000))
    again = {**_quality_record("mrpc", "sora", 2, 0.70, kept=1000), "key": "mrpc-sora-s2-rerun"}
    common.append_jsonl(results / "quality.jsonl", again)  # seed 2 under another key, newer than 0.83 ...
    newest = _quality_record("mrpc", "sora", 2, 0.85, kept=1000)
    common.append_jsonl(results / "quality.jsonl", newest)  # ... and the first key re-run, newest of all: 0.85
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| mrpc | sora | 3 | +1.67 met | 50.0 % met | – |" in text  # (2 + 0 + 3) / 3
    assert "| mrpc (f1) | sora | 3 | 83.67 ± 1.53 |" in text


def _per_task_cell(task, variant, seed, lr_, val, test, kept=1000, epochs=20.0):
    """A cell of the per-task protocol (one dev split for all seeds) at learning rate `lr_`."""
    method = quality.VARIANTS[variant][0]
    extra = tuple(sorted({"split_seed": "0", **lr.grid_extra(method, lr_)}.items()))
    record = _quality_record(task, variant, seed, test=test, kept=kept, val=val)
    record.update(key=quality.Cell(task, variant, seed, epochs, extra=extra).key, extra=dict(extra), epochs=epochs)
    return record


def test_claims_pair_each_variant_at_its_own_per_task_lr_and_show_only_intervals_that_exclude_zero(tmp_path):
    from bench import claims

    cell = _per_task_cell
    records = []
    for task in ("mrpc", "rte", "cola", "stsb"):
        for variant, best in (("sora-budget", "8e-4"), ("lora-equal", "2e-3")):
            records += [cell(task, variant, 0, g, 0.9 if g == best else 0.5, 0.1) for g in lr.GRID if g != best]
        # at the winning lr: sora-budget above lora-equal by 2, 3, 4 points (seed 0 also the search's)
        records += [cell(task, "sora-budget", s, "8e-4", 0.9, 0.80 + 0.01 * s) for s in range(3)]
        records += [cell(task, "lora-equal", s, "2e-3", 0.9, 0.78 - 0.01 * s) for s in range(3)]
    records += [cell("mrpc", "lora", 0, g, 0.5, 0.5) for g in ("2e-4", "8e-4")]  # search incomplete: left out
    assert claims.t_interval([0.02, 0.04, 0.06]) == pytest.approx((0.04, 0.04 - 0.0497, 0.04 + 0.0497), abs=1e-4)
    text = "\n".join(claims.claims_section(records))
    assert "| mrpc (f1) | sora-budget | 8e-4 | 3 | 81.00 ± 1.00 |" in text
    assert "| mrpc (f1) | lora-equal | 2e-3 | 3 | 77.00 ± 1.00 |" in text  # only its cells at the winning lr
    assert "| mrpc (f1) | lora |" not in text
    row = next(line for line in text.splitlines() if line.startswith("| sora-budget − lora-equal"))
    assert "+4.00 [-0.97, +8.97] not shown" in row  # Δ 2, 4, 6: too few seeds for so much spread
    assert row.endswith("| **shown** |")  # over the four tasks the interval excludes 0
    family = "\n".join(quality_tables.quality_section(records)[0])
    assert "sora-budget" not in family  # the per-task cells are not averaged into the family-lr tables
    three = "\n".join(claims.claims_section([r for r in records if r["task"] != "stsb"]))
    assert "not judged (tasks missing)" in three  # a mean over three of the four tasks is no verdict
    old = "\n".join(claims.claims_section([{**r, "extra": {k: v for k, v in r["extra"].items() if k != "split_seed"},
                                            "key": r["key"] + "-old"} for r in records]))
    assert old == ""  # cells whose dev split moved with the seed are not in the per-task protocol's tables
    assert claims.verdict((0.01, 0.005, 0.02), 2).startswith("not judged")
    assert claims.verdict((-0.01, -0.02, -0.005), 3) == "shown worse"


def test_the_ten_epoch_block_is_judged_over_its_own_three_tasks_and_not_before_all_three_have_results():
    from bench import claims

    def block(tasks):
        records = []
        for task in tasks:
            for variant, test, step in (("sora-budget", 0.80, 0.01), ("lora-equal", 0.78, -0.01)):
                records += [_per_task_cell(task, variant, 0, g, 0.9 if g == "8e-4" else 0.5, 0.1, epochs=10.0)
                            for g in lr.GRID if g != "8e-4"]
                records += [_per_task_cell(task, variant, s, "8e-4", 0.9, test + step * s, epochs=10.0)
                            for s in range(3)]
        rows = [line for line in claims.claims_section(records) if line.startswith("| sora-budget − lora-equal")]
        return rows[0]

    assert block(("mrpc", "cola", "stsb")).endswith("| **shown** |")  # RTE is not part of the 10-epoch block
    assert block(("mrpc", "cola")).endswith("| not judged (tasks missing) |")


def test_a_pattern_control_counts_only_when_built_on_the_ranks_of_a_sora_budget_cell_the_table_shows(tmp_path):
    # were sora-budget's chosen lr to move, pattern cells built on its old cells' ranks must not be mixed in
    from bench import claims

    def cell(variant, seed, lr_, val, test, source=None):
        record = _per_task_cell("mrpc", variant, seed, lr_, val, test)
        record["key"] += source or ""
        if source:
            record["pattern"] = {"source": source, "shuffled": False}
        return record

    budget = [cell("sora-budget", s, g, 0.9 if g == "8e-4" else 0.5, 0.8) for s in range(3) for g in lr.GRID]
    shown = {r["seed"]: r["key"] for r in budget if lr.cell_lr(r, "sora") == "8e-4"}
    stale = {r["seed"]: r["key"] for r in budget if lr.cell_lr(r, "sora") == "2e-3"}
    pattern = [cell("lora-pattern", 0, g, 0.9 if g == "2e-4" else 0.5, 0.7, shown[0]) for g in lr.GRID]
    pattern += [cell("lora-pattern", s, "2e-4", 0.9, 0.7, shown[s]) for s in (1, 2)]
    pattern += [cell("lora-pattern", 1, "2e-4", 0.9, 0.1, stale[1])]  # newer, on the ranks of a cell not shown
    choice, cells = claims.per_task_groups(budget + pattern)[("minilm, 20 epochs, protocol paper, split_seed=0", "mrpc",
                                                               "lora-pattern")]
    assert choice == "2e-4" and sorted(c["seed"] for c in cells) == [0, 1, 2]
    assert {c["pattern"]["source"] for c in cells} == set(shown.values())


def test_the_claims_tables_show_when_each_variant_first_reached_lora_r8s_final_validation_score(tmp_path):
    from bench import claims

    def cell(variant, seed, lr_, curve):
        """A cell whose validation curve is `curve` (score at each 10 % of 100 steps, 1 s per step)."""
        record = _per_task_cell("mrpc", variant, seed, lr_, val=curve[-1], test=0.8)
        record["curve"] = [[10.0 * (i + 1), v, 10 * (i + 1)] for i, v in enumerate(curve)]
        record["metrics"]["steps"] = 100
        return record

    lora_curve = [0.5] * 9 + [0.9]
    records = [cell(v, 0, g, [0.1] * 10) for v in ("sora-budget", "lora") for g in lr.GRID if g != "8e-4"]
    records += [cell("lora", s, "8e-4", lora_curve) for s in range(2)]
    # seed 0 reaches LoRA r 8's final 0.9 at 40 % of training, seed 1 never does
    records += [cell("sora-budget", 0, "8e-4", [0.5] * 3 + [0.9] * 7), cell("sora-budget", 1, "8e-4", [0.8] * 10)]
    text = "\n".join(claims.claims_section(records))
    assert ("| mrpc (f1) | sora-budget | 8e-4 | 2 | 80.00 ± 0.00 | 1,000 | 0.40 (never in 1 of 2); "
            "0.40 (never in 1 of 2) |") in text
    assert "| mrpc (f1) | lora | 8e-4 | 2 | 80.00 ± 0.00 | 1,000 | – |" in text  # LoRA r 8 is the yardstick
