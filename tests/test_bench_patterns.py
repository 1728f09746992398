"""bench/patterns.py: the pattern controls (lora-pattern, random-pattern) train the ranks of their seed's
sora-budget cell, as found and shuffled (a fake cell runner: nothing is trained)."""

import json

import pytest

from bench import common, patterns, quality


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
