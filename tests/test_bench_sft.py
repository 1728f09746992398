"""bench/sft.py: the SFT cells (SmolLM2 on GSM8K) differ only in the method, their table and README section,
and the runner that runs two cells at a time (a fake cell runner: nothing is trained)."""

import os

import pytest

from bench import common, sft


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
