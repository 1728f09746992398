"""Smoke test of the speed harness (bench/speed.py, bench/speed_sft.py): a tiny BERT or causal LM, one step per
block. No timing is checked (the numbers of a smoke run mean nothing); only that every measurement runs and lands
in the record."""

import json

from bench import common, speed


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
