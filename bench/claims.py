"""Equal-size claims (issue 13): every variant at the lr its own per-task search chose, each claim a Δ paired
by seed with a 95 % t interval, per task and over the tasks; "shown" only when the interval excludes 0.

Per task, a variant enters once the seed-0 cells of every lr of the grid exist (bench/lr.py: its validation
search); its cells are those at the winning lr. A claim "A beats B" is judged on the test halves from the
seeds both have: Δ_s = score_A(s) − score_B(s); mean ± t(0.975, n − 1)·sd/√n. Over tasks, the mean of the
per-task means (each task counts once) with the standard error √(Σ sd_t²/n_t)/K and Welch–Satterthwaite's
degrees of freedom: the seeds' noise of every task, not the spread between tasks, which is no noise.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from soralib.train.rundir import KEPT_PARAMS, MAIN_METRIC

from . import lr, patterns
from .matrix import BLOCK_TASKS, TASKS, VARIANTS
from .quality_tables import main_score, setting, share_text, time_shares

MIN_SEEDS = 3
# (variant, control, what "shown" would mean). The first is the primary claim, the one the library's default
# rests on; the others are exploratory: of ~40 intervals at 95 %, about two exclude 0 by chance alone.
CLAIMS = (
    ("sora-budget", "lora-equal", "SoRA-budget scores above plain LoRA of the same size"),
    ("sora-budget", "lora-pattern", "training through the gates beats retraining LoRA with the ranks SoRA found"),
    ("lora-pattern", "random-pattern", "where SoRA puts the ranks matters (same ranks, shuffled over modules)"),
    ("sora-budget", "sora-budget-static", "learning the gates beats keeping the largest initial gates"),
    ("sora-budget-ones", "lora-equal", "gates that start equal (only the data separates them) beat LoRA of that size"),
    ("sora-budget-ones-glr", "lora-equal", "the same with a gate lr of their own (1e-2)"),
    ("sora-budget-ones-sgd", "lora-equal", "the same with plain SGD gates (the paper's proximal step)"),
    ("sora-budget-ones", "sora-budget", "gates that start equal beat random initial gates"),
    ("sora-budget-ones-trim", "lora-equal", "equal-start gates kept by size alone (trim ramp) beat LoRA of that size"),
    ("sora-budget-ones-trim", "sora-budget", "the same beats the reference budget gates"),
    ("sora-budget", "lora", "SoRA-budget (half the size) scores above LoRA r8"),
    ("lora-equal", "lora", "LoRA r4 scores above LoRA r8"),
)


def t_interval(deltas: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of a 95 % t interval; None below 2 values."""
    from scipy.stats import t

    if len(deltas) < 2:
        return None
    mean, half = statistics.mean(deltas), t.ppf(0.975, len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
    return mean, mean - half, mean + half


def pooled_interval(per_task: list[list[float]]) -> tuple[float, float, float] | None:
    """(mean, low, high) over tasks: the mean of per-task means, Welch–Satterthwaite df. None if a task has < 2."""
    from scipy.stats import t

    if not per_task or any(len(d) < 2 for d in per_task):
        return None
    k = len(per_task)
    mean = statistics.mean(statistics.mean(d) for d in per_task)
    var = [statistics.variance(d) / len(d) for d in per_task]  # of each task's mean
    se = math.sqrt(sum(var)) / k
    if se == 0:
        return mean, mean, mean
    df = sum(var) ** 2 / sum(v ** 2 / (len(d) - 1) for v, d in zip(var, per_task) if v > 0)
    half = t.ppf(0.975, df) * se
    return mean, mean - half, mean + half


def verdict(interval: tuple[float, float, float] | None, seeds: int) -> str:
    if interval is None or seeds < MIN_SEEDS:
        return "not judged (fewer than 3 seeds)"
    _, low, high = interval
    if low == high:
        return "not judged (no spread between seeds)"
    return "**shown**" if low > 0 else "shown worse" if high < 0 else "not shown"


def text(interval: tuple[float, float, float] | None) -> str:
    if interval is None:
        return "–"
    mean, low, high = (100 * x for x in interval)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def per_task_groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[str, list[dict[str, Any]]]]:
    """{(setting, task, variant): (chosen lr, one cell per seed at it)} for every complete per-task search."""
    groups: dict[tuple[str, str, str], tuple[str, list[dict[str, Any]]]] = {}
    for r in records:
        # the per-task protocol's cells only: one dev split for all seeds (split_seed), no AdaLoRA sizing
        if (r.get("kind") != "quality" or r["variant"] not in VARIANTS or r["seed"] != lr.SEARCH_SEED
                or "split_seed" not in (r.get("extra") or {}) or r.get("budget")):
            continue
        method = VARIANTS[r["variant"]][0]
        given = {k: v for k, v in (r.get("extra") or {}).items() if k != "lr"}
        where = (setting(r), r["task"], r["variant"])
        if where in groups:
            continue
        epochs, search = lr.search_of(r["epochs"], given, r.get("lr_from_epochs"))  # a long block: a shorter one's
        points = lr.per_task_points(records, r["model"], epochs, r.get("jobs", 1), r["task"], r["variant"], method,
                                    search)
        choice = lr.per_task_choice(points, r.get("lr_grid") or lr.GRID)
        if choice is None:
            continue
        cells = [c for c in records if c.get("kind") == "quality" and setting(c) == where[0] and c["task"] == r["task"]
                 and c["variant"] == r["variant"] and lr.cell_lr(c, method) == choice]
        groups[where] = (choice, cells)
    for (name, task, variant), (choice, cells) in groups.items():
        if variant in patterns.SHUFFLED:  # built on a sora-budget cell's ranks: only those of the cells shown count
            shown = {c["key"] for c in groups.get((name, task, "sora-budget"), (None, []))[1]}
            cells = [c for c in cells if (c.get("pattern") or {}).get("source") in shown]
        groups[(name, task, variant)] = (choice, list({c["seed"]: c for c in cells}.values()))  # run twice: newest
    return groups


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[float]:
    by_seed = {r["seed"]: main_score(r) for r in b}
    return [main_score(r) - by_seed[r["seed"]] for r in a
            if by_seed.get(r["seed"]) is not None and main_score(r) is not None]


def claims_section(records: list[dict[str, Any]]) -> list[str]:
    """The per-task-lr tables: each variant's cells, then each claim with its intervals and verdict."""
    newest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "quality":
            newest.pop(r["key"], None)
            newest[r["key"]] = r
    groups = per_task_groups(list(newest.values()))
    if not groups:
        return []
    lines = ["## Equal-size claims: every variant at its own per-task lr", "",
             f"Each variant's lr is the best of {', '.join(lr.GRID)} on seed 0's validation half, per task (its "
             "seed-0 cells are the search's own). Δ is paired by seed on the test half, ×100, with a 95 % t "
             "interval. Over tasks: the mean of the per-task means over the tasks with results, taken as fixed "
             "(metrics of different scales, averaged as GLUE does), with the seeds' noise of each task "
             "(Welch–Satterthwaite df), judged only when every task of the block has results (all four; the 10-epoch "
             "block runs MRPC, CoLA and STS-B). A claim is **shown** when its "
             f"interval excludes 0 and both sides have ≥ {MIN_SEEDS} seeds. The first claim is the primary one; "
             "the others are exploratory (of ~40 intervals at 95 %, about two exclude 0 by chance). To LoRA r 8's "
             "score: the share of LoRA r 8's training time, then of its steps, that a variant's validation curve "
             "needed to first reach LoRA r 8's final validation score, paired by seed (resolved to the validation "
             "points: every 10 % of training at eval_fraction=0.1); the paper's time claim is a share ≤ 0.70.", ""]
    for name in sorted({s for s, _, _ in groups}):
        tasks = sorted({t for s, t, _ in groups if s == name})
        epochs = next(rs[0]["epochs"] for (s, _, _), (_, rs) in groups.items() if s == name and rs)
        block = set(BLOCK_TASKS.get(epochs, TASKS))
        lines += [f"### {name}", "", "| task | variant | lr | seeds | test (mean ± sd) | adapter params "
                  "| to LoRA r 8's score (time; steps) |", "|---|---|---|---|---|---|---|"]
        for task in tasks:
            for variant in [v for v in VARIANTS if (name, task, v) in groups]:
                choice, rs = groups[(name, task, variant)]
                scores = [100 * s for s in map(main_score, rs) if s is not None]
                spread = f" ± {statistics.stdev(scores):.2f}" if len(scores) > 1 else ""
                params = statistics.mean(r["metrics"][KEPT_PARAMS] for r in rs)
                if rs[0].get("lr_from_epochs"):
                    choice += f" (its {rs[0]['lr_from_epochs']:g}-epoch search)"
                lora = groups.get((name, task, "lora"), ("", []))[1] if variant != "lora" else []
                seconds, steps = time_shares(rs, lora), time_shares(rs, lora, "steps")
                reach = f"{share_text(seconds)}; {share_text(steps)}" if seconds or steps else "–"
                lines.append(f"| {task} ({rs[0]['metrics'].get(MAIN_METRIC)}) | {variant} | {choice} | {len(rs)} | "
                             f"{statistics.mean(scores):.2f}{spread} | {params:,.0f} | {reach} |")
        rows = []
        for variant, control, meaning in CLAIMS:
            per_task = {t: paired(groups[(name, t, variant)][1], groups[(name, t, control)][1]) for t in tasks
                        if (name, t, variant) in groups and (name, t, control) in groups}
            if not per_task:
                continue
            seeds = min(len(d) for d in per_task.values())
            cells = [f"{text(t_interval(per_task[t]))} {verdict(t_interval(per_task[t]), len(per_task[t]))}"
                     if t in per_task else "–" for t in tasks]
            pooled = pooled_interval(list(per_task.values()))
            overall = verdict(pooled, seeds) if set(per_task) >= block else "not judged (tasks missing)"
            rows.append(f"| {variant} − {control}: {meaning} | " + " | ".join(cells) + f" | {text(pooled)} | {overall} |")
        if rows:
            lines += ["", "| claim | " + " | ".join(tasks) + " | mean over the tasks | verdict |",
                      "|---|" + "---|" * (len(tasks) + 2)] + rows
        lines.append("")
    return lines
