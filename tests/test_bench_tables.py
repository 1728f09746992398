"""bench/tables.py and bench/quality_tables.py: the README's tables regenerated from fake results (speed,
quality per task and averaged over tasks), the records they leave out, and the share of LoRA's time to its score."""

from bench import common, quality_tables, speed, tables
from bench_helpers import _quality_record


def _speed_record():
    ratios = {k: 1.0 for k in speed.LABELS}
    return {"kind": "speed", "key": "speed-x", "params": {"model": "minilm", "batch": 32, "seq": 128, "steps": 10,
                                                          "blocks": 5},
            "ratios": ratios, "targets": {k: t for k, (t, _) in common.TARGETS.items()},
            "met": {k: common.target_met(k, 1.0) for k in common.TARGETS}, "medians_ms": {"sora.step": 10.0},
            "memory_mb": {"sora": 500.0}, "flops": {"method": "FlopCounterMode", "train_flops_per_step": 1e9,
                                                    "achieved_flops_per_s": 1e10, "matmul_peak_flops_per_s": 2e10},
            "notes": [], "machine": {"cores": 2, "threads": 2, "torch": "x", "platform": "y"}, "commit": "b" * 40,
            "command": "python -m bench.speed", "time": "2026-01-01T00:00:00"}


def test_tables_regenerate_the_readme_between_markers(tmp_path):
    results = tmp_path / "results"
    common.append_jsonl(results / "speed.jsonl", _speed_record())
    for seed, (lora, sora) in enumerate([(0.80, 0.82), (0.84, 0.84)]):
        common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "lora", seed, lora, kept=2000))
        common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "sora", seed, sora, kept=1200))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nHand-written.\n\n{tables.BEGIN}\nstale table\n{tables.END}\n")
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written.\n\n" + tables.BEGIN) and "stale table" not in text
    assert "| mrpc (f1) | sora | 2 | 83.00 ± 1.41 | 1,200 | 1.00 ± 1.41 | 60.0 |" in text
    assert "| mrpc (f1) | lora | 2 | 82.00 ± 2.83 | 2,000 | 0.00 ± 0.00 | 100.0 |" in text
    assert "Speed (minilm, 2026-01-01T00:00:00): 4 of 6 met; missed: sora_over_adalora_step, " in text
    # two seeds of three: the claims are shown, not judged
    assert "| mrpc | sora | 2 (not judged) | +1.00 | 60.0 % | – |" in text
    from soralib.cli import main as sora

    assert sora(["bench", "tables", "--results-dir", str(results), "--readme", str(readme)]) == 0  # `sora bench`
    assert readme.read_text() == text  # regenerating is idempotent


def test_tables_leave_a_resumed_cells_partial_wall_time_out_of_the_mean(tmp_path):
    results = tmp_path / "results"
    common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "lora", 0, 0.80, 2000, wall=300.0))
    resumed = {**_quality_record("mrpc", "lora", 1, 0.82, 2000, wall=40.0), "resumed": True}
    common.append_jsonl(results / "quality.jsonl", resumed)
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    assert "| 100.0 | 300 (1 resumed, not counted) |" in readme.read_text()


def test_tables_never_show_a_superseded_record_even_under_a_live_key(tmp_path):
    results = tmp_path / "results"
    common.append_jsonl(results / "quality.jsonl", _quality_record("mrpc", "lora", 0, 0.80, 2000))
    old = {**_quality_record("mrpc", "lora", 0, 0.10, 2000), "superseded_by": "abc"}  # sorts after quality.jsonl
    common.append_jsonl(results / "superseded.jsonl", old)
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| mrpc (f1) | lora | 1 | 80.00 |" in text and "10.00" not in text


def test_tables_average_each_method_over_tasks_with_deltas_paired_by_seed(tmp_path):
    results = tmp_path / "results"
    cells = {("mrpc", "lora"): [(0.80, 2000), (0.84, 2000)], ("mrpc", "sora"): [(0.82, 1200), (0.83, 1200)],
             ("rte", "lora"): [(0.60, 2000), (0.70, 2000)], ("rte", "sora"): [(0.64, 1000), (0.70, 1000)]}
    for (task, variant), seeds in cells.items():
        for seed, (score, kept) in enumerate(seeds):
            common.append_jsonl(results / "quality.jsonl", _quality_record(task, variant, seed, score, kept))
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    # mrpc: deltas +0.02 and -0.01 -> +0.50 ± 2.12; rte: +0.04 and 0.00 -> +2.00 ± 2.83 (×100)
    assert "| mrpc (f1) | sora | 2 | 82.50 ± 0.71 | 1,200 | 0.50 ± 2.12 | 60.0 |" in text
    assert "| rte (accuracy) | sora | 2 | 67.00 ± 4.24 | 1,000 | 2.00 ± 2.83 | 50.0 |" in text
    # over tasks: score (82.5 + 67) / 2, delta (0.5 + 2) / 2, params (60 + 50) / 2
    assert "| sora | 2 | 2 | 74.75 | +1.25 | 55.0 |" in text
    assert "| lora | 2 | 2 | 73.50 | +0.00 | 100.0 |" in text


def test_time_to_lora_score_is_measured_in_seconds_and_in_steps():
    lora = {"metrics": {"main_metric": "f1", "eval": {"f1": 0.7}, "train_seconds": 50.0, "steps": 400}}
    sora = {"curve": [[10.0, 0.5, 100], [20.0, 0.8, 200]]}
    assert quality_tables.time_to_score(sora, lora) == 20.0 / 50.0
    assert quality_tables.time_to_score(sora, lora, "steps") == 200 / 400
    assert quality_tables.time_to_score({"curve": [[10.0, 0.5, 100]]}, lora) == float("inf")  # never reached
    old = {"curve": [[10.0, 0.8]]}  # a record from before step counts
    assert quality_tables.time_to_score(old, lora, "steps") is None
    timed = {**lora, "curve": [[20.0, 0.6, 200], [40.0, 0.7, 400]]}  # its clock: evaluations left out
    assert quality_tables.time_to_score(sora, timed) == 20.0 / 40.0


def test_seeds_that_never_reach_lora_score_are_counted_not_averaged():
    assert quality_tables.share_text([0.5, float("inf"), 0.7]) == "0.60 (never in 1 of 3)"
    assert quality_tables.share_text([float("inf")]) == "never"
    assert quality_tables.share_text([]) == "–"
