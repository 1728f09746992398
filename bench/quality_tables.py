"""The quality tables of bench/README.md: per setting and task, each method against LoRA, and the claims checked.

A setting is what must be equal for cells to be compared: model, epochs, extra overrides and the job count.
Within it each method family appears at the lr its validation search chose (bench/lr.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from soralib.train.rundir import EVAL, KEPT_PARAMS, MAIN_METRIC, STEPS, TEST, TRAIN_SECONDS

from . import common, lr
from .quality import VARIANTS

SORA_VARIANTS = ("sora", "sora-schedule", "sora-budget")
MIN_SEEDS = 3  # the issue: at least 3 seeds per cell before a claim is judged


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_std(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0] * scale:.2f}"
    return f"{statistics.mean(values) * scale:.2f} ± {statistics.stdev(values) * scale:.2f}"


def setting(r: dict[str, Any]) -> str:
    """Cells are compared only within one setting: model, epochs, extra overrides and jobs side by side."""
    extra = ", ".join(f"{k}={v}" for k, v in sorted((r.get("extra") or {}).items()) if k != "lr")  # see lr_line
    jobs = r.get("jobs", 1)
    return (f"{r['model']}, {r['epochs']:g} epochs, protocol {r.get('protocol')}" + (f", {extra}" if extra else "")
            + (f", {jobs} cells at a time × {r.get('threads')} thread(s)" if jobs > 1 else ""))


def main_score(r: dict[str, Any], split: str = TEST) -> float | None:
    metrics = r["metrics"]
    return metrics.get(split, {}).get(metrics.get(MAIN_METRIC))


def time_to_score(sora: dict[str, Any], lora: dict[str, Any], axis: str = "seconds") -> float | None:
    """Share of LoRA's training time (`axis` "seconds") or steps ("steps") that a method needed to first
    reach LoRA's final validation score, from its validation curve; None when there is no curve (or no
    step counts, in records older than them); inf when it never reached the score."""
    goal = main_score(lora, EVAL)
    if axis == "steps":
        lora_total = lora["metrics"].get(STEPS)
    elif lora.get("curve"):  # the curve's own clock: metrics' train_seconds may count the evaluations too
        lora_total = lora["curve"][-1][0]
    else:
        lora_total = lora["metrics"].get(TRAIN_SECONDS)
    curve = sora.get("curve") or []
    if not curve or goal is None or not lora_total or (axis == "steps" and len(curve[0]) < 3):
        return None
    at = 0 if axis == "seconds" else 2
    return next((point[at] / lora_total for point in curve if point[1] >= goal), float("inf"))


@dataclass
class Check:
    """The paper's three claims for one SoRA variant on one task, against LoRA in the same setting."""

    setting: str
    task: str
    variant: str
    seeds: int  # seeds both the variant and LoRA have: a claim is judged from MIN_SEEDS on
    delta: float | None  # mean over those seeds of score minus LoRA's score (target ≥ 0), as in the table
    params: float  # share of LoRA's adapter parameters (target ≤ 0.70)
    shares: list[float]  # per seed, share of LoRA's training time to reach LoRA's final validation score (≤ 0.70)

    def cells(self) -> list[str]:
        """Each claim's value, followed by met / missed once MIN_SEEDS seeds are in."""
        share = statistics.mean(self.shares) if self.shares else None  # inf when a seed never got there
        delta = None if self.delta is None else f"{100 * self.delta:+.2f}"
        claims = [(delta, self.delta is not None and self.delta >= 0),
                  (f"{100 * self.params:.1f} %", self.params <= 0.7),
                  (share_text(self.shares) if self.shares else None, share is not None and share <= 0.7)]
        return ["–" if text is None else text + (f" {common.STATUS[ok]}" if self.seeds >= MIN_SEEDS else "")
                for text, ok in claims]


def quality_section(records: list[dict[str, Any]]) -> tuple[list[str], list[Check]]:
    """The per-task tables and the paper's claims checked per (setting, task, SoRA variant)."""
    # the per-task protocol's cells (one dev split for all seeds) are tabulated by bench.claims, at their own lrs
    quality = [r for r in records if r.get("kind") == "quality" and "split_seed" not in (r.get("extra") or {})]
    lines = ["## Quality", ""]
    checks: list[Check] = []
    if not quality:
        return lines + ["Not yet measured: run `python -m bench.quality`.", ""], checks
    newest: dict[str, dict[str, Any]] = {}
    for r in quality:  # a re-run cell (same key): its newest line counts, and in the newest line's place
        newest.pop(r["key"], None)
        newest[r["key"]] = r
    quality = list(newest.values())
    chosen = {s: lr.chosen(quality, *s) for s in lr.settings(quality)}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    heads: dict[str, str] = {}
    for r in quality:
        where = (r["model"], r["epochs"], r.get("jobs", 1))
        if lr.in_protocol(r, chosen[where]):  # the other lrs of a search are in its own table only
            groups.setdefault((setting(r), r["task"], r["variant"]), []).append(r)
            heads[setting(r)] = lr_line(chosen[where])
    for (name, task, variant), rs in groups.items():  # AdaLoRA sized by the sora cell of the table's seed
        if variant == "adalora":
            sora = {r["seed"]: r["key"] for r in groups.get((name, task, "sora"), [])}
            rs[:] = [r for r in rs if (r.get("budget") or {}).get("source", "default") in (sora.get(r["seed"]),
                                                                                             "default")]
    # One cell per seed: a seed trained twice (another key, e.g. after a harness change) counts once, newest.
    groups = {where: list({r["seed"]: r for r in rs}.values()) for where, rs in groups.items() if rs}
    for name in sorted({s for s, _, _ in groups}):
        lines += [f"### {name}", "", heads[name], "", "| task | method | seeds | test metric (mean ± sample std, ×100) "
                  "| adapter params | Δ vs LoRA, paired by seed | % of LoRA | wall time (s) "
                  "| time to LoRA's score (share of LoRA's) | steps to it (share) |", "|---" * 10 + "|"]
        for task in sorted({t for s, t, _ in groups if s == name}):
            lora = groups.get((name, task, "lora"), [])
            lora_params = statistics.mean(r["metrics"][KEPT_PARAMS] for r in lora) if lora else None
            for variant in [v for v in VARIANTS if (name, task, v) in groups]:
                rs = groups[(name, task, variant)]
                scores = [s for s in map(main_score, rs) if s is not None]
                params = statistics.mean(r["metrics"][KEPT_PARAMS] for r in rs)
                # a resumed cell's wall time is only the part after the resume: not comparable, not averaged
                walls = [r["wall_seconds"] for r in rs if r.get("wall_seconds") is not None and not r.get("resumed")]
                resumed = sum(bool(r.get("resumed")) for r in rs)
                share, step_share = time_shares(rs, lora), time_shares(rs, lora, "steps")
                lines.append(f"| {task} ({rs[0]['metrics'].get(MAIN_METRIC)}) | {variant} | {len(rs)} | "
                             f"{mean_std(scores, 100)} | {params:,.0f} | {mean_std(_paired_deltas(rs, lora), 100)} | "
                             f"{fmt(100 * params / lora_params, 1) if lora_params else '–'} | "
                             f"{fmt(statistics.mean(walls), 0) if walls else '–'}"
                             f"{f' ({resumed} resumed, not counted)' if resumed else ''} | "
                             f"{share_text(share) if share or not lora else 'n/a (no validation curve)'} | "
                             f"{share_text(step_share)} |")
                if variant in SORA_VARIANTS and lora:
                    deltas = _paired_deltas(rs, lora)
                    checks.append(Check(name, task, variant, len(deltas),
                                        statistics.mean(deltas) if deltas else None, params / lora_params, share))
        lines += [""] + _across_tasks(name, groups)
    lines += lr.search_tables(quality)
    commits = sorted({(r.get("commit") or "?")[:12] for r in quality})
    lines += [f"Commits: {', '.join(commits)}. Each line of bench/results/quality.jsonl holds its cell's exact "
              "`sora train` command (`run_command`), metrics.json and machine.", ""]
    return lines, checks


def lr_line(chosen: dict[str, str | None]) -> str:
    """The learning rates of a setting's cells (the SoRA variants train at sora's; full fine-tuning at 2e-5)."""
    return "Learning rates: " + ", ".join(
        f"{fam} {lr.text(lr.shipped(fam))} (shipped)" if value is None else f"{fam} {value} (validation search)"
        for fam, value in chosen.items()) + f", full {lr.text(lr.shipped('full'))} (shipped, not searched)."


def share_text(shares: list[float]) -> str:
    """Mean share over seeds; seeds that never reached LoRA's score are counted, not averaged in as inf."""
    reached = [s for s in shares if s != float("inf")]
    if not shares:
        return "–"
    if not reached:
        return "never"
    never = len(shares) - len(reached)
    return fmt(statistics.mean(reached), 2) + (f" (never in {never} of {len(shares)})" if never else "")


def _paired_deltas(rs: list[dict[str, Any]], lora: list[dict[str, Any]]) -> list[float]:
    """Score minus LoRA's score of the same seed (same split and data order): less noisy than two means."""
    by_seed = {r["seed"]: main_score(r) for r in lora}
    return [main_score(r) - by_seed[r["seed"]] for r in rs
            if by_seed.get(r["seed"]) is not None and main_score(r) is not None]


def _across_tasks(name: str, groups: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[str]:
    """Per method, the mean over the tasks of one setting (every task counts once, whatever its seeds)."""
    tasks = sorted({t for s, t, _ in groups if s == name})
    if len(tasks) < 2:
        return []
    lines = ["Mean over tasks: each method over the tasks where it and LoRA both have results "
             "(every task counts once, whatever its number of seeds; in the time column, \"never in k\" counts "
             "tasks where some seed never reached LoRA's score):", "",
             "| method | tasks | seeds per task | test metric (×100) | Δ vs LoRA | % of LoRA's params | "
             "time to LoRA's score |", "|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        rows = [(groups[(name, t, variant)], groups[(name, t, "lora")]) for t in tasks
                if (name, t, variant) in groups and (name, t, "lora") in groups]
        if not rows:
            continue
        score = [statistics.mean(s for s in map(main_score, rs) if s is not None) for rs, _ in rows]
        delta = [statistics.mean(d) for d in (_paired_deltas(rs, lora) for rs, lora in rows) if d]
        params = [statistics.mean(r["metrics"][KEPT_PARAMS] for r in rs)
                  / statistics.mean(r["metrics"][KEPT_PARAMS] for r in lora) for rs, lora in rows]
        share = [statistics.mean(x) for x in (time_shares(rs, lora) for rs, lora in rows) if x]
        seeds = sorted({len(rs) for rs, _ in rows})
        delta_text = f"{100 * statistics.mean(delta):+.2f}" if delta else "–"  # no seed shared with LoRA
        lines.append(f"| {variant} | {len(rows)} | {'/'.join(map(str, seeds))} | {100 * statistics.mean(score):.2f} | "
                     f"{delta_text} | {100 * statistics.mean(params):.1f} | "
                     f"{share_text(share)} |")
    return lines + [""]


def time_shares(rs: list[dict[str, Any]], lora: list[dict[str, Any]], axis: str = "seconds") -> list[float]:
    """`time_to_score` of each cell of `rs` against LoRA's cell of the same seed; seeds without one, or without a
    validation curve, are left out."""
    by_seed = {r["seed"]: r for r in lora}
    shares = [time_to_score(r, by_seed[r["seed"]], axis) for r in rs if r["seed"] in by_seed]
    return [s for s in shares if s is not None]
