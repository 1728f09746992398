"""bench/gates.py: the ranks a fixed threshold or a budget alone would keep, predicted from the initial gates of
a real run of `sora train` on a tiny BERT."""

import json

import torch
from safetensors.torch import load_file, save_file

from bench import common, gates
from conftest import train_args


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
    adapter = tmp_path / "runs" / "rte-sora-budget-ones-s0-e2" / "sora_adapter" / "adapter_model.safetensors"
    weights = load_file(str(adapter))
    gate = next(k for k, v in weights.items() if k.endswith("sora_gate") and int((v != 0).sum()) >= 3)
    weights[gate][torch.nonzero(weights[gate])[:3, 0]] = 1e-6  # alive, yet a millionth of the others
    save_file(weights, str(adapter))
    assert gates.main(["--results", str(results), "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    budget, ones = common.read_jsonl(out)
    assert budget["rule"] == "budget" and 0 < budget["alive"] < budget["ranks"]
    assert budget["agree"] == budget["ranks"]  # gates that never learn: g0 decides every rank
    assert ones["gate_init"] == "ones" and "predicted" not in ones  # all equal: nothing to predict from
    # in this short run no gate was cut before the hold (τ never climbed far), so the kept ranks are all alike
    # but the three set to 1e-6 below: kept, adding nothing, and counted as idle
    assert ones["idle"] == 3
    assert budget["alive"] == ones["alive"]  # the same budget: the same number of ranks alive
    assert 0.5 <= ones["chance"] < 1 and ones["chance"] == budget["chance"]  # two random draws of that share
    assert "| rte-sora-budget-ones-s0-e2 | budget | ones |" in "\n".join(gates.table([budget, ones]))
