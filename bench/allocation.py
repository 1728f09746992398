"""Does the data decide where the ranks go? How alike the per-module kept ranks of a SoRA variant's seeds are.

If the gates learned where rank matters for a task, two seeds of it (other initial gates and data order, the
same data) would put the ranks in the same modules; if the initial draw decides, their patterns are unrelated.
Per (setting, task, variant, lr) with at least two seeds: the mean Pearson correlation of the per-module kept
ranks over the seed pairs, against the same mean with each pair's modules shuffled (a seeded permutation null):
its 95 % range is what chance alone gives. Reads the `ranks` the quality records carry (from sparsity.json).
A variant that keeps the same rank in every module has no pattern to compare: it is left out.
"""

from __future__ import annotations

import itertools
import random
import statistics
from typing import Any

from .quality_tables import setting

DRAWS = 2000  # permutations of the null: its 2.5 and 97.5 percentiles move by ~0.01 between seeds of the draw


def pearson(a: list[float], b: list[float]) -> float | None:
    """The correlation of two equally long lists; None when either is constant."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return statistics.correlation(a, b)


def agreement(patterns: list[dict[str, int]], draws: int = DRAWS, seed: int = 0
              ) -> tuple[float, float, float] | None:
    """(mean correlation over the pairs of patterns, the null's 2.5 and 97.5 percentiles), or None when a
    pattern is constant. Patterns are {module: kept rank} over the same modules."""
    modules = sorted(patterns[0])
    vectors = [[p[m] for m in modules] for p in patterns]
    pairs = list(itertools.combinations(vectors, 2))
    observed = [pearson(a, b) for a, b in pairs]
    if any(r is None for r in observed):
        return None
    rng = random.Random(seed)
    null = sorted(statistics.mean(pearson(a, rng.sample(b, len(b))) for a, b in pairs) for _ in range(draws))
    return statistics.mean(observed), null[int(0.025 * draws)], null[int(0.975 * draws) - 1]


def groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[int, dict[str, int]]]:
    """{(setting, task, variant, lr): {seed: per-module kept ranks}} of the SoRA cells that stored their ranks
    (a seed trained twice: its newest record)."""
    found: dict[tuple[str, str, str, str], dict[int, dict[str, int]]] = {}
    for r in records:
        if r.get("kind") == "quality" and r.get("ranks") and r["variant"].startswith("sora"):
            where = (setting(r), r["task"], r["variant"], (r.get("extra") or {}).get("lr", "shipped"))
            found.setdefault(where, {})[r["seed"]] = r["ranks"]
    return found


def table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per group with two seeds or more (no group: nothing)."""
    rows = []
    for (name, task, variant, lr), by_seed in sorted(groups(records).items()):
        if len(by_seed) < 2 or len({frozenset(p) for p in by_seed.values()}) > 1:
            continue
        result = agreement(list(by_seed.values()))
        if result is None:
            continue
        mean, low, high = result
        verdict = "seeds agree beyond chance" if mean > high else "no more alike than chance"
        rows.append(f"| {name} | {task} | {variant} | {lr} | {len(by_seed)} | {len(next(iter(by_seed.values())))} "
                    f"| {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {verdict} |")
    if not rows:
        return []
    return ["### Do seeds put the ranks in the same modules? (`bench/allocation.py`)", "",
            "Mean Pearson correlation of the per-module kept ranks over the pairs of seeds, against the 95 % "
            "range of that mean with the modules shuffled. Learned allocation should repeat across seeds; an "
            "allocation the initial gates decide should not.", "",
            "| setting | task | variant | lr | seeds | modules | mean r | chance (95 %) | verdict |",
            "|---" * 9 + "|"] + rows + [""]
