"""Turn a finished run directory into PNG plots and a markdown summary in ``run_dir/report/``.

Reads only what a run wrote (metrics.json, sparsity.json, history.jsonl, stages.jsonl: report_data.py reads
and checks them); each plot and section appears only when its data exist. Every file is written atomically, so
an interrupted report never leaves a half-written PNG or markdown file behind. matplotlib is imported only when
drawing.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes, atomic_write_text
from .report_data import is_number, module_records, read_jsonl, read_run
from .train.rundir import (EVAL, GENERATIONS, HIGHER_IS_BETTER, KEPT_PARAMS, LORA_PARAMS_AT_R_MAX, MAIN_METRIC, METHOD,
                           SEED, STEPS, TASK, TEST, TRAIN_SECONDS)
from .train.tasks.generate import sample_generations

log = logging.getLogger(__name__)

# A layer index is a purely numeric path component followed by more path: "bert.encoder.layer.11.attention...".
# The lookahead leaves the trailing dot unconsumed so that back-to-back indices ("h.1.2.x") all match.
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.)")


def module_position(module: str) -> tuple[int | None, str]:
    """(layer index, module kind) of a module path, split at its last ``.<digits>.`` component.

    ``"bert.encoder.layer.11.attention.self.query"`` gives ``(11, "attention.self.query")``; a path with no
    layer index (``"classifier"``) gives ``(None, "classifier")``.
    """
    matches = list(_LAYER_INDEX.finditer(module))
    if not matches:
        return None, module
    last = matches[-1]
    return int(last.group(1)), module[last.end() + 1:]


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and ``report.md`` for `run_dir` into ``run_dir/report/``; return the markdown's path."""
    run_dir = Path(run_dir)
    metrics, sparsity, history, stages = read_run(run_dir)
    main = metrics.get(MAIN_METRIC) or next((s["main_metric"] for s in stages if s.get("main_metric")), None)

    out = run_dir / "report"
    images: list[tuple[str, str]] = []  # (caption, file name relative to report.md)
    plots = [
        ("Kept rank per module", "kept_rank_heatmap.png", lambda: _heatmap_figure(sparsity)),
        ("Kept rank and threshold over training", "kept_rank_over_steps.png", lambda: _steps_figure(history)),
        ("Memorization and generalization per stage", "stages.png", lambda: _stages_figure(stages, main)),
    ]
    for caption, name, draw in plots:
        fig = draw()
        if fig is None:  # drop a plot left by an earlier report so the folder matches report.md
            (out / name).unlink(missing_ok=True)
        else:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            atomic_write_bytes(out / name, buf.getvalue())
            images.append((caption, name))
            log.info("wrote %s", out / name)
    path = out / "report.md"
    atomic_write_text(path, _markdown(run_dir, metrics, sparsity, stages, main, images))
    log.info("wrote %s", path)
    return path


# ---------------------------------------------------------------- plots

def _figure(width: float, height: float):
    """A figure on an Agg canvas, built without pyplot: no global backend switch (a notebook calling this
    keeps its own backend) and no figure registry to leak into; the figure is freed like any object."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _heatmap_figure(sparsity: dict[str, Any]):
    """Kept rank per (layer, kind) cell, annotated; None without per-module data."""
    cells: dict[tuple[int | None, str], list[float]] = {}
    r_max = 1
    for module in module_records(sparsity):
        # Two paths may share a (layer, kind) cell, e.g. encoder and decoder of one model: show their mean.
        cells.setdefault(module_position(module["module"]), []).append(module["kept_rank"])
        r_max = max(r_max, module.get("r_max") or 1)
    if not cells:
        return None
    import numpy as np

    layers = sorted({layer for layer, _ in cells if layer is not None})
    if any(layer is None for layer, _ in cells):
        layers.append(None)
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), ranks in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = sum(ranks) / len(ranks)

    fig = _figure(max(5.0, 1.5 + 1.1 * len(kinds)), max(3.0, 1.6 + 0.32 * len(layers)))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=r_max, aspect="auto")
    fig.colorbar(image, ax=ax, label="kept rank")
    for (row, col), value in np.ndenumerate(grid):
        if not np.isnan(value):
            # viridis is dark at the low end: white text there, black on the bright high end.
            ax.text(col, row, f"{value:g}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 * r_max else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), ["-" if layer is None else str(layer) for layer in layers], fontsize=8)
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    title = "kept rank per module"
    if is_number(sparsity.get("kept_rank")) and is_number(sparsity.get("r_max_total")):
        title += f": {sparsity['kept_rank']} / {sparsity['r_max_total']} ranks"
    if is_number(sparsity.get("kept_fraction")):
        title += f", kept fraction {sparsity['kept_fraction']:.1%}"
    ax.set_title(title, fontsize=10)
    return fig


def _steps_figure(history: list[dict[str, Any]]):
    """Kept rank (left) and threshold (right) against step, stage changes dashed; None without kept ranks."""
    ranked = [row for row in history if is_number(row.get("kept_rank"))]
    if not ranked:
        return None
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    lines = ax.plot([r["step"] for r in ranked], [r["kept_rank"] for r in ranked], color="C0", label="kept rank")
    ax.set_xlabel("step")
    ax.set_ylabel("kept rank", color="C0")
    thresholds = [row for row in history if is_number(row.get("threshold"))]
    if thresholds:
        right = ax.twinx()
        values = [r["threshold"] for r in thresholds]
        # The threshold holds until the next logged value (it changes per stage), hence a step curve.
        lines += right.plot([r["step"] for r in thresholds], values, color="C1", label="threshold",
                            drawstyle="steps-post")
        right.set_ylabel("threshold", color="C1")
        if all(v > 0 for v in values):
            right.set_yscale("log")
    staged = [(row["step"], row["stage"]) for row in history if row.get("stage") is not None]
    for (_, before), (step, after) in zip(staged, staged[1:]):
        if after != before:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    # Below the axes: inside, the legend would cover whichever curve happens to run along the top.
    fig.legend(handles=lines, loc="outside lower center", ncol=2)
    ax.set_title("kept rank and threshold over training", fontsize=10)
    return fig


def _stages_figure(stages: list[dict[str, Any]], main: str | None):
    """Memorization and generalization main metric against kept parameters, one point per stage."""
    series = {}
    for split in ("memorization", "generalization"):
        points = []
        for stage in stages:
            value = (stage.get(split) or {}).get(stage.get("main_metric") or main)
            if is_number(stage.get("kept_params")) and is_number(value):
                points.append((stage["kept_params"], value, stage.get("stage", "?")))
        if points:
            series[split] = points
    if not series:
        return None
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    for (split, points), marker in zip(series.items(), "os"):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=split)
        for x, y, number in points:
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    xs = [p[0] for points in series.values() for p in points]
    if min(xs) > 0 and max(xs) / min(xs) > 10:  # a log axis only helps once the stages span a decade
        ax.set_xscale("log")
    ax.set_xlabel("kept parameters")
    ax.set_ylabel(main or "main metric")
    ax.legend()
    ax.set_title("memorization and generalization per stage (labels: stage)", fontsize=10)
    return fig


# ---------------------------------------------------------------- markdown

def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if is_number(value) and isinstance(value, float) else str(value)


def _markdown(run_dir: Path, metrics: dict, sparsity: dict, stages: list[dict], main: str | None,
              images: list[tuple[str, str]]) -> str:
    """The report text; each section only when its data exist."""
    if metrics:
        title = f"{metrics.get(TASK, '?')} / {metrics.get(METHOD, '?')} / seed {metrics.get(SEED, '?')}"
    else:
        title = run_dir.name
    md = [f"# Run report: {title}", ""]
    if not metrics:
        md += ["Unfinished run: no metrics.json yet (interrupted, or still training). What follows is what it "
               "logged so far; `sora train --resume` continues it.", ""]

    splits = [s for s in (EVAL, TEST) if isinstance(metrics.get(s), dict) and metrics[s]]
    if splits:
        names = list(dict.fromkeys(name for s in splits for name in metrics[s]))
        md += ["## Metrics", "", "| metric | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
        for name in names:
            lower = ", lower is better" if metrics.get(HIGHER_IS_BETTER) is False else ""
            label = f"**{name}** (main{lower})" if name == main else name
            md.append(f"| {label} | " + " | ".join(_fmt(metrics[s].get(name, "")) for s in splits) + " |")
        md.append("")
    md += sample_generations(read_jsonl(run_dir / GENERATIONS))

    facts = []
    kept = metrics.get(KEPT_PARAMS, sparsity.get("kept_params"))  # sparsity.json: prune.sparsity_report's keys
    full = metrics.get(LORA_PARAMS_AT_R_MAX, sparsity.get("lora_params_at_r_max"))
    if is_number(kept) and is_number(full) and full > 0:
        facts.append(f"- Kept parameters: {kept:,} of {full:,} for LoRA at r_max ({kept / full:.2%})")
    elif is_number(kept):
        facts.append(f"- Kept parameters: {kept:,}")
    if is_number(sparsity.get("kept_rank")) and is_number(sparsity.get("r_max_total")):
        facts.append(f"- Kept rank: {sparsity['kept_rank']} of {sparsity['r_max_total']}")
    if is_number(metrics.get(TRAIN_SECONDS)):
        seconds = metrics[TRAIN_SECONDS]
        facts.append(f"- Train time: {seconds:.1f} s ({seconds / 60:.1f} min)")
    if is_number(metrics.get(STEPS)):
        facts.append(f"- Steps: {metrics[STEPS]}")
    if facts:
        md += ["## Size and cost", "", *facts, ""]

    kinds: dict[str, list[dict[str, Any]]] = {}  # module kind -> its modules, in model order
    for module in module_records(sparsity):
        kinds.setdefault(module_position(module["module"])[1], []).append(module)
    if kinds:
        md += ["## Kept rank per module kind", "", "| kind | modules | mean r_max | mean kept rank | kept params |",
               "|---|---|---|---|---|"]
        for kind, modules in kinds.items():
            mean_r = sum(m.get("r_max", 0) for m in modules) / len(modules)
            mean_kept = sum(m["kept_rank"] for m in modules) / len(modules)
            params = sum(m.get("kept_params", 0) for m in modules)
            md.append(f"| `{kind}` | {len(modules)} | {mean_r:.2f} | {mean_kept:.2f} | {params:,} |")
        md.append("")

    if stages:
        metric = main or "main metric"
        md += ["## Stages", "", f"| stage | threshold | kept params | kept fraction | generalization ({metric}) "
               f"| memorization ({metric}) |", "|---|---|---|---|---|---|"]
        for s in stages:
            m = s.get("main_metric") or main
            cells = [s.get("stage", ""), _fmt(s.get("threshold", ""), ".3g"),
                     f"{s['kept_params']:,}" if is_number(s.get("kept_params")) else "",
                     f"{s['kept_fraction']:.2%}" if is_number(s.get("kept_fraction")) else "",
                     _fmt((s.get("generalization") or {}).get(m, "")), _fmt((s.get("memorization") or {}).get(m, ""))]
            md.append("| " + " | ".join(str(c) for c in cells) + " |")
        md.append("")

    if images:
        md += ["## Plots", ""]
        for caption, name in images:
            md += [f"### {caption}", "", f"![{caption}]({name})", ""]
    return "\n".join(md)
