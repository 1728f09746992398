"""Which learning rate each method family trains with: its shipped one, or the winner of a validation search.

The search is plain quality cells of seed 0 run with `--set lr=VALUE` beside the shipped lr's (no `lr`):

    python -m bench.quality --tasks cola,mrpc --seeds 0 --methods sora,lora,adalora --epochs 3 --jobs 2 --set lr=2e-4

Per family (sora, lora, adalora; the SoRA variants share sora's), the winner is the lr with the best validation
score (the dev set's first half: the test half is never looked at) averaged over the searched tasks (those
with a `--set lr=` cell); until every tried lr has every searched task, nothing is chosen. Only cells run
with `--set lr=` (the record's command says so) and shipped-lr cells are search points: the matrix's own
cells at a chosen lr (on a new task, or AdaLoRA sized by sora at another lr) never change the choice. Full
fine-tuning is not searched: it keeps its shipped 2e-5. Searches are separate per setting (model, epochs,
jobs): a cell's wall time and steps depend on them, and so may the best lr.
"""

from __future__ import annotations

import shlex
import statistics
from typing import Any, Iterable

from soralib.train.rundir import EVAL, MAIN_METRIC

SEARCHED = ("sora", "lora", "adalora")
SEARCH_SEED = 0


def text(value: float) -> str:
    """8e-4, not 0.0008: the spelling of the `--set lr=` values beside it (more digits where one is not exact)."""
    for digits in range(6):
        mantissa, exponent = f"{value:.{digits}e}".split("e")
        if float(f"{mantissa}e{exponent}") == value:
            return f"{mantissa}e{int(exponent)}"
    return repr(value)


def shipped(method: str) -> float:
    """The lr of the method's shipped YAML (src/soralib/configs/<method>.yaml): what a cell without `lr` trains at."""
    from soralib.train.config import build_config

    return build_config(method, None, {}).lr


def family(variant: str) -> str | None:
    """The searched family whose lr `variant` trains with (None: not searched, its shipped lr)."""
    base = "sora" if variant.startswith("sora") else variant
    return base if base in SEARCHED else None


def set_on_command_line(r: dict[str, Any]) -> bool:
    """Whether the cell's lr came from `--set lr=` of its bench.quality command (a search cell)."""
    words = shlex.split(r.get("command") or "")
    return any(a == "--set" and b.startswith("lr=") for a, b in zip(words, words[1:])) \
        or any(w.startswith("--set=lr=") for w in words)


def same_setting(r: dict[str, Any], model: str, epochs: float, jobs: int) -> bool:
    return (r.get("kind") == "quality" and r["model"] == model and r["epochs"] == epochs
            and r.get("jobs", 1) == jobs)


def points(records: Iterable[dict[str, Any]], model: str, epochs: float, jobs: int
           ) -> dict[str, dict[str | None, dict[str, float]]]:
    """{family: {lr (None: shipped): {task: validation score of seed 0}}} of one setting's search cells."""
    found: dict[str, dict[str | None, dict[str, float]]] = {}
    for r in records:
        extra = r.get("extra") or {}
        if (not same_setting(r, model, epochs, jobs) or r["seed"] != SEARCH_SEED or set(extra) - {"lr"}
                or r["variant"] not in SEARCHED or ("lr" in extra and not set_on_command_line(r))):
            continue
        metrics = r["metrics"]
        score = metrics.get(EVAL, {}).get(metrics.get(MAIN_METRIC))
        if score is not None:
            found.setdefault(r["variant"], {}).setdefault(extra.get("lr"), {})[r["task"]] = score
    return found


def searched_tasks(by_lr: dict[str | None, dict[str, float]]) -> tuple[set[str], bool]:
    """(the tasks a family's search lrs were tried on, whether every lr - the shipped one too - has them all)."""
    tasks = set().union(*(set(scores) for value, scores in by_lr.items() if value is not None))
    return tasks, bool(tasks) and all(tasks <= set(scores) for scores in by_lr.values())


def chosen(records: Iterable[dict[str, Any]], model: str, epochs: float, jobs: int) -> dict[str, str | None]:
    """{family: the lr it trains with}: the best mean validation score over the searched tasks; None (its
    shipped lr) while a search is incomplete, so cells arriving mid-search never switch the matrix's lr.
    Ties go to the shipped lr, then to the smaller lr."""
    best: dict[str, str | None] = {}
    for fam, by_lr in points(records, model, epochs, jobs).items():
        tasks, complete = searched_tasks(by_lr)
        if complete:
            mean = {value: statistics.mean(scores[t] for t in tasks) for value, scores in by_lr.items()}
            order = sorted(by_lr, key=lambda v: (v is not None, 0.0 if v is None else float(v)))
            best[fam] = max(order, key=mean.__getitem__)  # max keeps the first of equals
    return {fam: best.get(fam) for fam in SEARCHED}


def in_protocol(r: dict[str, Any], lrs: dict[str, str | None]) -> bool:
    """Whether a cell ran at its family's chosen lr (a cell of another lr is a search point only)."""
    fam, extra = family(r["variant"]), r.get("extra") or {}
    return "lr" not in extra if fam is None else extra.get("lr") == lrs.get(fam)


def settings(records: Iterable[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """The (model, epochs, jobs) settings that have quality cells."""
    return sorted({(r["model"], r["epochs"], r.get("jobs", 1)) for r in records if r.get("kind") == "quality"})


def search_tables(records: list[dict[str, Any]]) -> list[str]:
    """Markdown: per setting with a search, each family's validation score per lr and task, and the winner."""
    lines: list[str] = []
    for model, epochs, jobs in settings(records):
        found = {fam: by_lr for fam, by_lr in points(records, model, epochs, jobs).items() if len(by_lr) > 1}
        if not found:
            continue
        picked = chosen(records, model, epochs, jobs)
        tasks = sorted({t for by_lr in found.values() for scores in by_lr.values() for t in scores})
        lines += [f"### lr search: {model}, {epochs:g} epochs, {jobs} cell(s) at a time; seed {SEARCH_SEED}, "
                  "validation half (×100)", "", f"| method | lr | {' | '.join(tasks)} | mean over searched tasks | |",
                  "|---|---|" + "---|" * (len(tasks) + 2)]
        for fam, by_lr in found.items():
            searched, complete = searched_tasks(by_lr)
            for value in sorted(by_lr, key=lambda v: shipped(fam) if v is None else float(v)):
                scores = by_lr[value]
                mean = f"{100 * statistics.mean(scores[t] for t in searched):.2f}" if searched <= set(scores) else "–"
                cells = " | ".join(f"{100 * scores[t]:.2f}" if t in scores else "–" for t in tasks)
                name = f"{text(shipped(fam))} (shipped)" if value is None else value
                verdict = ("chosen" if value == picked[fam] else "") if complete else "search incomplete"
                lines.append(f"| {fam} | {name} | {cells} | {mean} | {verdict} |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------ per-task search
# The fair footing for a claim between methods (issue 13): every variant picks its own lr per task from the
# same grid, on seed 0's validation half. A grid lr equal to the method's shipped one is run without `lr` in
# the cell's overrides, so the shipped-lr cells of earlier sittings are this search's points too.
GRID = ("2e-4", "8e-4", "2e-3")
PATTERNED = ("lora-pattern", "random-pattern")  # cells that count only with the pattern they trained (bench.patterns)


def grid_extra(method: str, value: str) -> dict[str, str]:
    """The cell overrides that train `method` at `value`: none at its shipped lr."""
    return {} if float(value) == shipped(method) else {"lr": text(float(value))}


def cell_lr(r: dict[str, Any], method: str) -> str:
    """The lr a finished cell trained at, in `text` spelling."""
    return text(float((r.get("extra") or {}).get("lr", shipped(method))))


# Overrides that change what a run measures, not how it trains: a search's choice holds across them.
EVAL_ONLY = ("eval_fraction", "eval_each_epoch")


def search_of(epochs: float, given: dict[str, str], lr_from_epochs: float | None) -> tuple[float, dict[str, str]]:
    """(epochs, overrides) of the per-task search whose choice cells of `epochs` with `given` train at: their own,
    or with `--lr-from-epochs` the shorter search's, matched on everything but the eval-only overrides."""
    if lr_from_epochs is None:
        return epochs, given
    return lr_from_epochs, {k: v for k, v in given.items() if k not in EVAL_ONLY}


def per_task_points(records: Iterable[dict[str, Any]], model: str, epochs: float, jobs: int, task: str,
                    variant: str, method: str, given: dict[str, str]) -> dict[str, float]:
    """{lr: validation score} of the seed-0 cells of (task, variant) whose other overrides are `given`."""
    found: dict[str, float] = {}
    for r in records:
        extra = {k: v for k, v in (r.get("extra") or {}).items() if k != "lr"}
        if (same_setting(r, model, epochs, jobs) and r["task"] == task and r["variant"] == variant
                and r["seed"] == SEARCH_SEED and extra == given and (r.get("pattern") or variant not in PATTERNED)):
            metrics = r["metrics"]
            score = metrics.get(EVAL, {}).get(metrics.get(MAIN_METRIC))
            if score is not None:
                found[cell_lr(r, method)] = score
    return found


def per_task_choice(scores: dict[str, float], grid: Iterable[str]) -> str | None:
    """The grid lr with the best validation score; None until every grid lr has one. Ties: the smaller lr."""
    grid = sorted((text(float(g)) for g in grid), key=float)
    if not all(g in scores for g in grid):
        return None
    return max(grid, key=lambda g: scores[g])  # max keeps the first (smallest) of equals
