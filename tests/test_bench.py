"""Smoke test of the benchmark harness in bench/: a tiny BERT, one step per block. No timing is checked
(the numbers of a smoke run mean nothing); only that every measurement runs and lands in the record."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a package at the repository root, not part of the installed soralib
    sys.path.insert(0, str(ROOT))

from bench import common, gates, lr, patterns, quality, quality_tables, sft, speed, tables  # noqa: E402
from test_train_cli import glue_dir, tiny_model, train_args  # noqa: E402,F401  (fixtures)


def test_speed_smoke_records_every_ratio_and_the_machine(tmp_path, capsys):
    out = tmp_path / "speed.jsonl"
    argv = ["--tiny", "--json", "--steps", "1", "--blocks", "1", "--batch", "4", "--seq", "16", "--matmul-size", "64",
            "--pad-examples", "16", "--out", str(out)]
    assert speed.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["ratios"]) == set(speed.LABELS)
    assert set(result["targets"]) == set(common.TARGETS) == set(result["met"])
    data_free = set(speed.LABELS) - {"padded_over_ours_epoch"}  # that one needs the shared GLUE copy
    assert all(isinstance(result["ratios"][k], float) for k in data_free - {"sora_over_lora_memory_above_base"})
    assert {"cores", "torch", "threads", "platform"} <= set(result["machine"])
    assert result["command"].startswith("python -m bench.speed --tiny")
    assert result["commit"] is None or len(result["commit"]) == 40
    assert {"sora.step", "lora.step", "adalora.step", "sora.prox", "matmul.matmul"} <= set(result["medians_ms"])
    assert common.read_jsonl(out) == [result]
    assert speed.main(argv) == 0  # the same cell again: skipped, nothing appended
    assert common.read_jsonl(out) == [result]


def test_speed_sft_workload_times_sora_against_lora_on_a_causal_lm(tmp_path, capsys):
    out = tmp_path / "speed_sft.jsonl"
    argv = ["--workload", "sft", "--tiny", "--json", "--steps", "1", "--blocks", "1", "--seq", "16", "--out", str(out)]
    assert speed.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["params"]["workload"] == "sft" and result["params"]["batch"] == 4
    assert {"sora.step", "lora.step", "sora.prox"} <= set(result["medians_ms"]) and "adalora.step" not in result["medians_ms"]
    assert set(result["memory_mb"]) == {"base", "sora", "lora"} and result["targets"]["sora_over_lora_step"] == "≤ 1.00"
    assert isinstance(result["ratios"]["sora_over_lora_step"], float) and common.read_jsonl(out) == [result]


def test_sft_cells_differ_only_in_the_method_and_the_table_pairs_them_by_seed(tmp_path, capsys):
    args = sft.parse(["--results", str(tmp_path / "sft.jsonl"), "--runs-dir", str(tmp_path / "runs")])
    flags = {v: dict(zip(c[4::2], c[5::2])) for v, c in ((v, sft.command(v, 0, args)) for v in sft.VARIANTS)}
    method_flags = {"--method", "--r", "--lora-alpha", "--target-rank", "--output-dir"}
    shared = [{k: x for k, x in f.items() if k not in method_flags} for f in flags.values()]
    assert shared[0] == shared[1] == shared[2] and {"--max-steps", "--lr", "--eval-fraction"} <= set(shared[0])
    assert sft.main(["--results", str(tmp_path / "sft.jsonl"), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("run   sft-") == 6  # 3 variants x seeds 0, 1
    with pytest.raises(SystemExit):
        sft.parse(["--jobs", str((os.cpu_count() or 1) + 1)])
    records = [{"variant": v, "seed": s, "metrics": {"kept_params": 10, "eval": {"loss": loss + s / 100,
                                                                              "exact_match": 0.1}}}
               for v, loss in (("sora-budget", 1.0), ("lora-equal", 1.2)) for s in (0, 1, 2)]
    rows = sft.table(records)
    assert rows[2].startswith("| sora-budget | 3 | 10 | 1.0100 |") and "+0.2000" in rows[2] and "not judged" in rows[2]


def test_sft_section_shows_each_settings_table_and_the_mean_loss_at_each_evaluated_step():
    settings = {"model": "smollm2", "data": "gsm8k", "steps": 50, "batch": 4, "max_length": 384, "lr": "8e-4",
                "train_samples": 2000, "eval_samples": 64, "generate_samples": 50, "eval_fraction": 0.5}
    records = [{"kind": "sft", "variant": v, "seed": s, "settings": settings, "wall_seconds": 600.0, "jobs": 2,
                "threads": 1, "commit": "b" * 40, "validation_loss": [[25, 1.5 + s], [50, 1.0 + s]],
                "metrics": {"kept_params": 1234, "eval": {"loss": 1.0 + s, "exact_match": 0.02}}}
               for v in ("lora-equal", "sora-budget") for s in (0, 1)]
    text = "\n".join(sft.section(records + [{"kind": "speed"}]))
    assert "### smollm2 on gsm8k: 50 steps of batch 4" in text and "mean wall time per cell 10 min" in text
    assert "| sora-budget | 2 | 1,234 | 1.5000 | 0.020 | +0.0000" in text
    assert "| sora-budget | 2.0000 | 1.5000 |" in text  # the mean of seeds 0 and 1 at steps 25 and 50
    assert sft.section([]) == ["## SFT: SmolLM2 on GSM8K (`python -m bench.sft`)", "", "Not yet measured.", ""]


def test_sft_runs_cells_two_at_a_time_and_records_each_once(tmp_path, monkeypatch, capsys):
    results = tmp_path / "sft.jsonl"
    ran = []

    def fake_cell(variant, seed, args):
        ran.append((variant, seed))
        return {"key": sft.key(variant, seed, args), "variant": variant, "seed": seed, "settings": sft.settings(args),
                "metrics": {"kept_params": 1, "eval": {"loss": 1.0 + seed, "exact_match": 0.0}}}

    monkeypatch.setattr(sft, "run_cell", fake_cell)
    argv = ["--results", str(results), "--runs-dir", str(tmp_path / "runs"), "--jobs", "2"]
    assert sft.main(argv) == 0 and len(ran) == 6 and len(common.read_jsonl(results)) == 6
    assert sft.main(argv) == 0 and len(ran) == 6  # the second call finds every cell done
    assert capsys.readouterr().out.count("skip  sft-") == 6


def _quality_record(task, variant, seed, test, kept, wall=100.0, val=None):
    metric = {"mrpc": "f1", "rte": "accuracy", "cola": "matthews_correlation", "stsb": "pearson"}[task]
    return {"kind": "quality", "key": f"{task}-{variant}-s{seed}-e20", "task": task, "variant": variant,
            "method": variant.split("-")[0], "seed": seed, "epochs": 20.0, "model": "minilm", "protocol": "paper",
            "extra": {}, "wall_seconds": wall, "curve": None, "commit": "a" * 40, "machine": {"cores": 2},
            "metrics": {"main_metric": metric, "eval": {metric: val if val is not None else test},
                        "test": {metric: test}, "kept_params": kept, "lora_params_at_r_max": 2000,
                        "train_seconds": wall}}


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


def test_quality_starts_no_cell_after_its_time_is_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "run_cell", lambda *a: (_ for _ in ()).throw(AssertionError("a cell started")))
    results = tmp_path / "quality.jsonl"
    argv = ["--lr-search", "family", "--tasks", "rte", "--seeds", "0", "--methods", "sora,lora", "--start-within", "0", "--results",
            str(results), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    assert "2 cell(s) left for the next run" in capsys.readouterr().out and not results.exists()


def test_seeds_that_never_reach_lora_score_are_counted_not_averaged():
    assert quality_tables.share_text([0.5, float("inf"), 0.7]) == "0.60 (never in 1 of 3)"
    assert quality_tables.share_text([float("inf")]) == "never"
    assert quality_tables.share_text([]) == "–"


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


def _lr_record(task, variant, seed, val, lr=None, kept=1000, search=True):
    """A finished cell at `lr` (None: the shipped lr), keyed exactly as the harness keys it; a search cell
    (`--set lr=` on its command) or, with search=False, a matrix cell at a chosen lr."""
    extra = (("lr", lr),) if lr else ()
    record = _quality_record(task, variant, seed, test=val, kept=kept, val=val)
    record.update(key=quality.Cell(task, variant, seed, 20.0, extra=extra).key, extra=dict(extra),
                  command="python -m bench.quality --seeds 0" + (f" --set lr={lr}" if lr and search else ""))
    if variant == "adalora":  # sized by the sora cell of its own lr, as in a search
        record["budget"] = {"source": quality.Cell(task, "sora", seed, 20.0, extra=extra).key}
    return record


def _lr_search():
    """lora: 2e-4 wins on the mean (0.72 against 0.70) though it loses on mrpc; sora: the shipped lr wins;
    adalora: 2e-4 wins on rte, the one task it was searched on."""
    return [_lr_record("rte", "lora", 0, 0.60), _lr_record("mrpc", "lora", 0, 0.80),
            _lr_record("rte", "lora", 0, 0.66, "2e-4"), _lr_record("mrpc", "lora", 0, 0.78, "2e-4"),
            _lr_record("rte", "sora", 0, 0.70), _lr_record("mrpc", "sora", 0, 0.85),
            _lr_record("rte", "sora", 0, 0.65, "2e-4", kept=700), _lr_record("mrpc", "sora", 0, 0.80, "2e-4"),
            _lr_record("rte", "adalora", 0, 0.45), _lr_record("rte", "adalora", 0, 0.50, "2e-4")]


def test_each_family_trains_at_the_lr_with_the_best_mean_validation_score():
    assert lr.chosen(_lr_search(), "minilm", 20.0, 1) == {"sora": None, "lora": "2e-4", "adalora": "2e-4"}
    running = _lr_search() + [_lr_record("rte", "lora", 0, 0.90, "2e-3")]  # best so far, but mrpc not yet run
    assert lr.chosen(running, "minilm", 20.0, 1)["lora"] is None  # an incomplete search chooses nothing yet
    # the matrix's own cells never reopen or sway the search: the chosen lr on a task not searched (where an
    # older shipped-lr cell exists), and AdaLoRA at its lr sized by sora at the shipped lr, scoring worse
    sized = _lr_record("rte", "adalora", 0, 0.10, "2e-4", search=False)
    sized.update(key=sized["key"] + "-bxyz", budget={"source": quality.Cell("rte", "sora", 0, 20.0).key})
    matrix = _lr_search() + [_lr_record("cola", "lora", 0, 0.5), sized,
                             _lr_record("cola", "lora", 0, 0.3, "2e-4", search=False)]
    assert lr.chosen(matrix, "minilm", 20.0, 1) == lr.chosen(_lr_search(), "minilm", 20.0, 1)
    tie = [_lr_record("rte", "lora", 0, 0.6), _lr_record("rte", "lora", 0, 0.6, "5e-4")]
    assert lr.chosen(tie, "minilm", 20.0, 1)["lora"] is None  # a tie keeps the shipped lr
    assert lr.chosen(_lr_search(), "minilm", 20.0, 2) == {"sora": None, "lora": None, "adalora": None}  # other jobs
    assert [lr.family(v) for v in ("sora-budget", "sora-schedule", "lora", "full")] == ["sora", "sora", "lora", None]
    assert (lr.shipped("lora"), lr.shipped("full")) == (8e-4, 2e-5)  # read from the shipped YAMLs


def test_the_matrix_runs_each_family_at_its_searched_lr_unless_one_lr_is_set(tmp_path, capsys):
    results = tmp_path / "quality.jsonl"
    for record in _lr_search():
        common.append_jsonl(results, record)
    argv = ["--lr-search", "family", "--dry-run", "--tasks", "rte", "--seeds", "0,1", "--methods", "sora,lora,adalora", "--results",
            str(results), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "lr    lora: 2e-4" in out and "lr    sora: shipped" in out and "lr    adalora: 2e-4" in out
    runs = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith("run ")}
    assert "skip  " + quality.Cell("rte", "lora", 0, 20.0, extra=(("lr", "2e-4"),)).key in out  # the search cell
    lora1 = next(line for key, line in runs.items() if key.startswith("rte-lora-s1"))
    assert "--lr 2e-4" in lora1 and all("--lr" not in line for key, line in runs.items() if "sora" in key)
    # AdaLoRA's search cell was sized by sora at 2e-4 (700 parameters); the matrix sizes it by sora at sora's lr
    adalora0 = next(line for key, line in runs.items() if key.startswith("rte-adalora-s0"))
    assert "--lr 2e-4" in adalora0 and "--target-params 1000" in adalora0
    assert quality.main(argv + ["--set", "lr=5e-4"]) == 0  # one lr for all: how a search's cells are run
    out = capsys.readouterr().out
    assert out.count("run   ") == 6 and out.count("--lr 5e-4") == 4 and out.count("lr 5e-4") == 6


def test_tables_show_each_family_at_its_chosen_lr_and_the_search_apart(tmp_path):
    results = tmp_path / "results"
    full = [_lr_record("rte", "full", 0, 0.75), _lr_record("rte", "full", 1, 0.20, "5e-4")]  # full: not searched
    for record in _lr_search() + full:
        common.append_jsonl(results / "quality.jsonl", record)
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("Learning rates: sora 8e-4 (shipped), lora 2e-4 (validation search), adalora 2e-4 (validation search)"
            in text)
    assert "| rte (accuracy) | full | 1 | 75.00 |" in text  # its cell at another lr is left out, not averaged in
    assert "| rte (accuracy) | lora | 1 | 66.00 |" in text and "| rte (accuracy) | lora | 1 | 60.00 |" not in text
    assert "| rte (accuracy) | adalora |" not in text  # its 2e-4 cell was sized by a sora cell not in the table
    sized = _lr_record("rte", "adalora", 0, 0.55, "2e-4", search=False)  # the matrix's: sized by sora at 8e-4
    sized.update(key=sized["key"] + "-bxyz", budget={"source": quality.Cell("rte", "sora", 0, 20.0).key})
    common.append_jsonl(results / "quality.jsonl", sized)
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    assert "| rte (accuracy) | adalora | 1 | 55.00 |" in readme.read_text()
    search = "| lora | 2e-4 | 78.00 | 66.00 | 72.00 | chosen |\n| lora | 8e-4 (shipped) | 80.00 | 60.00 | 70.00 |  |"
    assert search in text


def test_gates_tool_finds_the_ranks_a_fixed_threshold_alone_would_keep(glue_dir, tiny_model, tmp_path, monkeypatch):
    from soralib.cli import main as sora

    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))  # the tokenized data: not in the home directory
    run = tmp_path / "runs" / "rte-sora-s0-e2"
    # gates that barely move (gate lr 1e-9): only the prox step acts, so the prediction must hold exactly,
    # which it can only if the tool rebuilt the run's initial gates
    assert sora(train_args(glue_dir, tiny_model, run, "--threshold", "0.08", "--gate-lr", "1e-9")) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    results, out = tmp_path / "quality.jsonl", tmp_path / "gates.jsonl"
    common.append_jsonl(results, {"key": run.name, "variant": "sora", "metrics": metrics})
    argv = ["--results", str(results), "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    assert gates.main(argv) == 0
    [record] = common.read_jsonl(out)
    assert record["xi_T"] == 0.08 * metrics["steps"] and 0 < record["alive"] < record["ranks"]
    assert record["agree"] == record["ranks"] and record["alive"] == record["predicted"]
    assert gates.main(argv) == 0 and len(common.read_jsonl(out)) == 1  # a measured cell is skipped
    assert "| rte-sora-s0-e2 | fixed | randn | 12 | 0.96 |" in "\n".join(gates.table([record]))


def test_gates_tool_predicts_a_budget_runs_kept_ranks_from_g0_and_gives_only_chance_for_equal_gates(
        glue_dir, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    from soralib.cli import main as sora

    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    results, out = tmp_path / "quality.jsonl", tmp_path / "gates.jsonl"
    # static gates under a budget: the trim keeps the largest abs(g0) that fit, which the tool must rebuild
    for name, flags in (("rte-sora-budget-s0-e2", ["--gate-init", "randn"]),
                        ("rte-sora-budget-ones-s0-e2", ["--gate-init", "ones"])):
        run = tmp_path / "runs" / name
        assert sora(train_args(glue_dir, tiny_model, run, "--target-rank", "2", "--gate-lr", "1e-9", *flags)) == 0
        metrics = json.loads((run / "metrics.json").read_text())
        common.append_jsonl(results, {"key": name, "variant": name[4:].rsplit("-s0", 1)[0], "metrics": metrics})
    assert gates.main(["--results", str(results), "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    budget, ones = common.read_jsonl(out)
    assert budget["rule"] == "budget" and 0 < budget["alive"] < budget["ranks"]
    assert budget["agree"] == budget["ranks"]  # gates that never learn: g0 decides every rank
    assert ones["gate_init"] == "ones" and "predicted" not in ones  # all equal: nothing to predict from
    assert budget["alive"] == ones["alive"]  # the same budget: the same number of ranks alive
    assert 0.5 <= ones["chance"] < 1 and ones["chance"] == budget["chance"]  # two random draws of that share
    assert "| rte-sora-budget-ones-s0-e2 | budget | ones |" in "\n".join(gates.table([budget, ones]))


def test_per_task_search_runs_every_grid_lr_on_seed_0_then_the_other_seeds_at_the_winner(tmp_path, monkeypatch,
                                                                                          capsys):
    score = {"2e-4": 0.70, None: 0.60, "2e-3": 0.75}  # None: the shipped 8e-4; rte's winner is 2e-3
    ran = []

    def fake_run_cell(cell, args, records):
        extra = dict(cell.extra)
        ran.append((cell.task, cell.seed, extra.get("lr")))
        best = score[extra.get("lr")] - (0.2 if cell.task == "mrpc" and extra.get("lr") == "2e-3" else 0)
        return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "seed": cell.seed,
                "epochs": cell.epochs, "model": cell.model, "jobs": cell.jobs, "extra": extra,
                "metrics": {"main_metric": "accuracy", "eval": {"accuracy": best}, "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    results = tmp_path / "quality.jsonl"
    argv = ["--tasks", "rte,mrpc", "--seeds", "0,1,2", "--methods", "lora-equal", "--results", str(results),
            "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("run   ") == 6 and "lr    lora-equal: searching" in out  # seeds 1, 2 wait for the search
    assert quality.main(argv) == 0  # one invocation: the search, then the seeds it planned
    assert sorted(ran, key=str) == sorted([(t, 0, lr_) for t in ("rte", "mrpc") for lr_ in ("2e-4", None, "2e-3")]
                                 + [("rte", 1, "2e-3"), ("rte", 2, "2e-3"), ("mrpc", 1, "2e-4"), ("mrpc", 2, "2e-4")],
                                 key=str)
    assert ran.index(("rte", 1, "2e-3")) < ran.index(("mrpc", 0, "2e-4"))  # a task's seeds before the next task
    records = common.read_jsonl(results)
    assert lr.per_task_choice(lr.per_task_points(records, "minilm", 20.0, 1, "rte", "lora-equal", "lora",
                                                 {"split_seed": "0"}), lr.GRID) == "2e-3"
    assert all(r["extra"]["split_seed"] == "0" for r in records)  # one dev split for every seed
    assert lr.per_task_choice({"2e-4": 0.5, "8e-4": 0.5}, lr.GRID) is None  # incomplete: nothing chosen
    assert lr.per_task_choice({"2e-4": 0.5, "8e-4": 0.5, "2e-3": 0.4}, lr.GRID) == "2e-4"  # a tie: the smaller
    assert quality.main(argv + ["--dry-run"]) == 0
    assert "lr    lora-equal: 2e-3, 2e-4" in capsys.readouterr().out


def test_claims_pair_each_variant_at_its_own_per_task_lr_and_show_only_intervals_that_exclude_zero(tmp_path):
    from bench import claims

    def cell(task, variant, seed, lr_, val, test, kept=1000):
        method = quality.VARIANTS[variant][0]
        extra = tuple(sorted({"split_seed": "0", **lr.grid_extra(method, lr_)}.items()))
        record = _quality_record(task, variant, seed, test=test, kept=kept, val=val)
        record.update(key=quality.Cell(task, variant, seed, 20.0, extra=extra).key, extra=dict(extra))
        return record

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


def test_pattern_controls_train_the_ranks_of_their_seeds_sora_budget_cell_as_found_and_shuffled(tmp_path, monkeypatch,
                                                                                              capsys):
    ran = {}

    def fake_run_cell(cell, args, records):
        ran[cell.key] = cell
        extra = dict(cell.extra)
        return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "seed": cell.seed,
                "epochs": cell.epochs, "model": cell.model, "jobs": cell.jobs, "extra": extra,
                "pattern": {"source": cell.pattern_from} if cell.pattern_from else None,
                "metrics": {"main_metric": "f1", "eval": {"f1": 0.9 if extra.get("lr") == "2e-3" else 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    results, ranks = tmp_path / "quality.jsonl", tmp_path / "ranks.jsonl"
    argv = ["--tasks", "mrpc", "--seeds", "0,1", "--methods", "sora-budget,lora-pattern,random-pattern", "--results",
            str(results), "--ranks", str(ranks), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    assert {c.variant for c in ran.values()} == {"sora-budget"}  # no ranks stored yet: the controls wait
    assert "wait  mrpc lora-pattern: the ranks of its sora-budget cells are not stored yet" in capsys.readouterr().out
    source = {s: quality.Cell("mrpc", "sora-budget", s, 20.0, extra=(("lr", "2e-3"), ("split_seed", "0"))).key
              for s in (0, 1)}
    for seed, key in source.items():  # what `sora ranks` stores once a sora cell's run exists
        common.append_jsonl(ranks, {"key": key, "lora_config": {"r": 3, "rank_pattern": {"^a": 1, "^b": 2, "^c": 3},
                                                                "alpha_pattern": {"^a": 2, "^b": 4, "^c": 6}}})
    assert quality.main(argv) == 0
    controls = [c for c in ran.values() if c.variant != "sora-budget"]
    assert len(controls) == 8  # each: three lrs on seed 0, then seed 1 at the winner
    assert all(c.pattern_from == source[c.seed] for c in controls)
    argv_ = quality.command(controls[0], quality.parse(argv), {})[0]
    assert argv_[argv_.index("--lora-config") + 1].endswith(f"{controls[0].key}.lora.json")
    found, shuffled = tmp_path / "found.json", tmp_path / "shuffled.json"
    stored = patterns.load(ranks)[source[0]]
    patterns.write("lora-pattern", "mrpc", 0, stored, found)
    patterns.write("random-pattern", "mrpc", 0, stored, shuffled)
    assert json.loads(found.read_text()) == stored
    moved = json.loads(shuffled.read_text())
    assert sorted(moved["rank_pattern"].values()) == [1, 2, 3] and moved["rank_pattern"] != stored["rank_pattern"]
    assert all(moved["alpha_pattern"][m] == 2 * r for m, r in moved["rank_pattern"].items())  # alpha goes along
    for one_lr in (["--lr-search", "family"], ["--set", "lr=2e-4"]):  # a pattern needs the per-task search
        with pytest.raises(SystemExit):
            quality.parse(argv + one_lr)


def test_a_long_block_trains_every_seed_at_the_lr_its_tasks_short_search_chose(tmp_path, monkeypatch, capsys):
    score = {"2e-4": 0.70, None: 0.60, "2e-3": 0.75}  # None: the shipped 8e-4; the 3-epoch winner is 2e-3
    ran = []

    def fake_run_cell(cell, args, records):
        extra = dict(cell.extra)
        ran.append((cell.task, cell.seed, cell.epochs, extra.get("lr")))
        return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "seed": cell.seed,
                "epochs": cell.epochs, "model": cell.model, "jobs": cell.jobs, "extra": extra,
                "lr_from_epochs": args.lr_from_epochs, "metrics": {"main_metric": "accuracy", "kept_params": 8,
                "eval": {"accuracy": score[extra.get("lr")]}, "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    base = ["--seeds", "0,1,2", "--methods", "lora-equal", "--results", str(tmp_path / "q.jsonl"),
            "--runs-dir", str(tmp_path / "runs")]
    long = base + ["--tasks", "rte,mrpc", "--epochs", "10", "--lr-from-epochs", "3", "--set", "eval_fraction=0.1"]
    assert quality.main(base + ["--tasks", "rte", "--epochs", "3", "--seeds", "0"]) == 0  # rte's search only
    ran.clear()
    assert quality.main(long) == 0
    assert ran == [("rte", s, 10.0, "2e-3") for s in (0, 1, 2)]  # no search at 10 epochs; mrpc has none at 3
    assert "wait  mrpc lora-equal: its search at 3 epochs is incomplete" in capsys.readouterr().out
    from bench import claims as claims_module

    claims = "\n".join(claims_module.claims_section(common.read_jsonl(tmp_path / "q.jsonl")))
    assert "| rte (accuracy) | lora-equal | 2e-3 (its 3-epoch search) | 3 |" in claims, claims
    with pytest.raises(SystemExit):
        quality.main(base + ["--epochs", "3", "--lr-from-epochs", "3"])
    assert "--lr-from-epochs 3: allowed only" in capsys.readouterr().err


def test_allocation_table_tells_ranks_placed_alike_by_every_seed_from_ranks_placed_by_chance():
    from bench import allocation

    rng = __import__("random").Random(1)
    modules = [f"layer.{i}.{kind}" for i in range(6) for kind in ("q", "k", "v", "o", "up", "down")]
    learned = {m: rng.randint(1, 8) for m in modules}

    def record(variant, seed, ranks):
        return {"kind": "quality", "key": f"mrpc-{variant}-s{seed}", "task": "mrpc", "variant": variant, "seed": seed,
                "epochs": 3.0, "model": "minilm", "protocol": "paper", "extra": {}, "ranks": ranks}

    records = ([record("sora-budget-ones", s, learned) for s in range(3)]
               + [record("sora-budget", s, {m: rng.randint(1, 8) for m in modules}) for s in range(3)]
               + [record("sora", s, {m: 8 for m in modules}) for s in range(3)])  # every rank kept: no pattern
    rows = {line.split(" | ")[2]: line for line in allocation.table(records) if line.startswith("| minilm")}
    assert set(rows) == {"sora-budget-ones", "sora-budget"}
    assert "+1.00" in rows["sora-budget-ones"] and rows["sora-budget-ones"].endswith("seeds agree beyond chance |")
    assert rows["sora-budget"].endswith("no more alike than chance |")
    mean, low, high = allocation.agreement([learned, {m: 9 - r for m, r in learned.items()}])
    assert mean == pytest.approx(-1.0) and low < 0 < high  # opposite patterns: far below chance, not "agree"
