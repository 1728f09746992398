"""bench/allocation.py: do a variant's seeds put the kept ranks in the same modules, beyond chance?"""

import pytest


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
