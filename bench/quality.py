"""Quality benchmark: a resumable matrix of `sora train` runs, task × method variant × seed.

    python -m bench.quality [--tasks rte,mrpc,cola,stsb] [--seeds 0,1,2] [--methods sora,lora,...]
                            [--epochs 20] [--jobs 1] [--start-within MINUTES] [--lr-from-epochs E] [--dry-run]
                            [--set FIELD=VALUE ...]

Every cell is one `sora train` subprocess into bench/runs/<key>/ under one protocol (MiniLM, protocol paper:
the dev set's first shuffled half selects, the second half is the test set; max length 128; batch 8; each
method family's lr chosen on the validation half by a search, see bench/lr.py, else its shipped one). A
finished cell (its key in the results JSONL) is skipped, an interrupted one resumed; each finished cell
appends one line: the run's metrics.json, wall time, the exact command, the commit and the machine.
Decoder-LLM SFT cells (SmolLM2 on GSM8K) are `python -m bench.sft`: one shared lr, not this per-task search.

`--jobs N` runs N cells at once, each with cores // N torch threads. On 2 cores two one-thread runs of
MiniLM at batch 8 do 1.3x the steps per second of one two-thread run (small matmuls thread poorly), but
every wall time then depends on its neighbour: the job count is part of the cell key, so cells run with
different job counts are never mixed in one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Sequence

from soralib.train.rundir import (CONFIG, HISTORY, KEPT_PARAMS, LORA_PARAMS_AT_R_MAX, MAIN_METRIC, METHOD, METRICS,
                                  SPARSITY, TEST)

from . import common, lr, patterns
from .matrix import TASKS, VARIANTS, Cell, cells  # noqa: F401  (the matrix, re-exported)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated GLUE tasks")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--methods", default=None, help=f"variants among {', '.join(VARIANTS)} (default: every "
                   "variant the --lr-search mode runs: per-task all but adalora and full, family all but the "
                   "pattern controls)")
    p.add_argument("--epochs", type=float, default=20.0, help="training epochs of every method (default 20); "
                   "sora-schedule spreads them over its 3 stages")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each with cores // jobs threads")
    p.add_argument("--start-within", type=float, default=None, metavar="MINUTES",
                   help="start no cell after this many minutes (running ones finish): a sitting that ends on time "
                        "instead of a killed cell, whose resumed run would lose the killed part's training time")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(common.GLUE_DIR) if common.GLUE_DIR.is_dir() else None,
                   help="GLUE TSV directory (default: ../shared/data/glue when present, else the hub)")
    p.add_argument("--lr-search", choices=("per-task", "family"), default="per-task",
                   help="per-task (default): every variant picks its lr per task from --lr-grid on seed 0's "
                        "validation half; family: one lr per method family from bench/lr.py's older search")
    p.add_argument("--lr-grid", default=",".join(lr.GRID), help="the per-task search's lrs (default %(default)s)")
    p.add_argument("--lr-from-epochs", type=float, default=None, metavar="EPOCHS",
                   help="per-task: run no search; every seed trains at the lr the search at EPOCHS epochs chose "
                        "for its task and variant (for a block too long to search at its own length)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra TrainConfig override for every cell (part of the cell key), e.g. max_steps=5")
    p.add_argument("--results", default=str(common.RESULTS / "quality.jsonl"), help="results JSONL")
    p.add_argument("--ranks", default=str(patterns.STORE), help="the sora cells' ranks (`sora ranks`), JSONL")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the run directories go")
    p.add_argument("--dry-run", action="store_true", help="list what would run and what is skipped; run nothing")
    args = p.parse_args(argv)
    if args.methods is None:
        left_out = ("adalora", "full") if args.lr_search == "per-task" else tuple(patterns.SHUFFLED)
        args.methods = ",".join(v for v in VARIANTS if v not in left_out)
    tasks = [t for t in args.tasks.split(",") if t not in TASKS]
    if tasks:
        p.error(f"unknown task(s) {tasks}; allowed: {', '.join(TASKS)} (SFT cells on GSM8K: python -m bench.sft)")
    unknown = [v for v in args.methods.split(",") if v not in VARIANTS]
    if unknown or any("=" not in s for s in args.set):
        p.error(f"unknown variant(s) {unknown}" if unknown else "--set takes FIELD=VALUE")
    if args.lr_search == "per-task" and "adalora" in args.methods.split(","):
        p.error("adalora is sized by its sora cell, which the per-task search does not pair: "
                "run it with --lr-search family")
    one_lr = args.lr_search == "family" or any(s.startswith("lr=") for s in args.set)
    if one_lr and set(args.methods.split(",")) & set(patterns.SHUFFLED):
        p.error(f"{', '.join(patterns.SHUFFLED)} take their ranks from the per-task search's sora-budget cells: "
                "run them with --lr-search per-task and no --set lr=")
    if args.lr_from_epochs is not None and (one_lr or args.lr_from_epochs == args.epochs):
        p.error(f"--lr-from-epochs {args.lr_from_epochs:g}: allowed only with --lr-search per-task, no --set lr=, "
                f"and epochs other than --epochs {args.epochs:g} (whose own search runs without it)")
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        p.error(f"--jobs {args.jobs}: allowed 1 to the number of cores ({os.cpu_count()})")
    return args


def command(cell: Cell, args: argparse.Namespace, records: dict[str, dict]) -> tuple[list[str], dict[str, Any]]:
    """(argv of the `sora train` subprocess, budget note) for `cell`."""
    method, overrides = VARIANTS[cell.variant]
    overrides = dict(overrides)
    epochs = cell.epochs
    budget: dict[str, Any] = {}
    if cell.variant == "sora-schedule":
        epochs = cell.epochs / overrides["num_stages"]  # the same total training as every other method
    if cell.variant == "adalora":
        kept = records.get(cell.budget_from or "", {}).get("metrics", {})
        # A budget of every rank is no budget: PEFT AdaLoRA fails (kthvalue out of range) at target_r == init_r.
        if kept.get(KEPT_PARAMS) and kept[KEPT_PARAMS] < (kept.get(LORA_PARAMS_AT_R_MAX) or float("inf")):
            overrides["target_params"] = kept[KEPT_PARAMS]
            budget = {"source": cell.budget_from, "target_params": kept[KEPT_PARAMS]}
        else:
            overrides["adalora_target_r"] = 4
            budget = {"source": "default", "adalora_target_r": 4}
    overrides.update({"task": cell.task, "model": cell.model, "protocol": "paper", "seed": cell.seed,
                      # the validation curve behind the time-to-score column (finer with --set eval_fraction=)
                      "eval_each_epoch": "false" if "eval_fraction" in dict(cell.extra) else "true",
                      "epochs": epochs, "output_dir": str(Path(args.runs_dir) / cell.key)})
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if cell.pattern_from:  # written by run_cell from the source's stored ranks
        overrides["lora_config"] = str(Path(args.runs_dir) / f"{cell.key}.lora.json")
    overrides.update(dict(cell.extra))
    argv = [sys.executable, "-m", "soralib.cli", "train", "--method", method]
    for name, value in overrides.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv, budget


def validation_curve(history: Path, main_metric: str) -> tuple[list[list[float]] | None, str]:
    """[[elapsed training seconds, validation score, training steps], ...] from history.jsonl, or (None, why).

    Reads the per-epoch validation lines that `--eval-each-epoch true` makes the harness write: "split":
    "validation", "elapsed_seconds" (training seconds so far, evaluations excluded, summed over stages)
    and "eval_<metric>". "step" restarts with each scheduler stage, so the steps of the earlier stages
    (each stage's last logged step) are added: the third value counts every step since the start, a
    time axis that no other process on the machine can disturb.
    """
    # A resumed run logs again the steps after its checkpoint: the newest line of each (stage, step, kind) counts.
    newest = {(r.get("stage", 1), r.get("step", 0), r.get("split"), "loss" in r): r for r in common.read_jsonl(history)}
    rows = sorted(newest.values(), key=lambda r: (r.get("stage", 1), r.get("step", 0)))
    last_step: dict[int, int] = {}
    for r in rows:
        stage = r.get("stage", 1)
        last_step[stage] = max(last_step.get(stage, 0), r.get("step", 0))

    def steps_so_far(r: dict) -> int:
        stage = r.get("stage", 1)
        return sum(n for s, n in last_step.items() if s < stage) + r.get("step", 0)

    points = [[r["elapsed_seconds"], r[f"eval_{main_metric}"], steps_so_far(r)] for r in rows
              if r.get("split") == "validation" and "elapsed_seconds" in r and f"eval_{main_metric}" in r]
    if not points:
        return None, "no per-epoch validation in history.jsonl (run without --eval-each-epoch)"
    return points, "per-epoch validation from history.jsonl"


def run_cell(cell: Cell, args: argparse.Namespace, records: dict[str, dict]) -> dict[str, Any] | None:
    """Train (or resume) one cell; its record, or None if `sora train` failed (the cell stays open)."""
    argv, budget = command(cell, args, records)
    run_dir = Path(args.runs_dir) / cell.key
    resumed = (run_dir / CONFIG).is_file() and not (run_dir / METRICS).is_file()
    if resumed:
        argv.append("--resume")
    wall = None
    if not (run_dir / METRICS).is_file():  # else: trained earlier, only the JSONL line was lost
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        if cell.pattern_from:
            patterns.write(cell.variant, cell.task, cell.seed, patterns.load(args.ranks)[cell.pattern_from],
                           Path(args.runs_dir) / f"{cell.key}.lora.json")
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(cell.threads)}  # torch's intra-op threads
        with open(run_dir.parent / f"{cell.key}.log", "a") as log:  # outside run_dir: sora train wants it empty
            done = subprocess.run(argv, cwd=common.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = round(time.perf_counter() - started, 3)
        if done.returncode != 0 or not (run_dir / METRICS).is_file():
            return None
    metrics = json.loads((run_dir / METRICS).read_text())
    sparsity = run_dir / SPARSITY
    ranks = ({m["module"]: m["kept_rank"] for m in json.loads(sparsity.read_text())["modules"]}
             if sparsity.is_file() else None)
    curve, curve_note = validation_curve(run_dir / HISTORY, metrics.get(MAIN_METRIC, ""))
    return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "method": metrics[METHOD],
            "seed": cell.seed, "epochs": cell.epochs, "model": cell.model, "protocol": "paper",
            "jobs": cell.jobs, "threads": cell.threads,
            "extra": dict(cell.extra), "metrics": metrics, "wall_seconds": wall, "resumed": resumed,
            "budget": budget or None, "ranks": ranks, "curve": curve,
            "lr_grid": args.lr_grid.split(",") if args.lr_search == "per-task" else None,
            "lr_from_epochs": args.lr_from_epochs,
            "pattern": {"source": cell.pattern_from, "shuffled": patterns.SHUFFLED[cell.variant]}
            if cell.pattern_from else None, "curve_note": curve_note,
            "run_command": f"OMP_NUM_THREADS={cell.threads} {shlex.join(argv)}"}


def unplanned_notes(args: argparse.Namespace, records: dict[str, dict]) -> list[str]:
    """A line per variant and task that planned no cell, and why: a pattern control whose sora-budget source has
    no stored ranks, or (with --lr-from-epochs) a variant whose shorter search is incomplete."""
    if args.lr_search != "per-task":
        return []
    planned = {(c.task, c.variant) for c in cells(args, records)}
    why = (f"its search at {args.lr_from_epochs:g} epochs is incomplete (or, for a pattern control, its "
           f"{patterns.SOURCE} cells' ranks are not stored yet)" if args.lr_from_epochs is not None else
           f"the ranks of its {patterns.SOURCE} cells are not stored yet ({args.ranks}; `sora ranks` runs when "
           "such a cell finishes here)")
    return [f"wait  {task} {variant}: {why}" for task in args.tasks.split(",") for variant in args.methods.split(",")
            if (variant in patterns.SHUFFLED or args.lr_from_epochs is not None) and (task, variant) not in planned]


def ready(cell: Cell, waiting: set[str]) -> bool:
    """AdaLoRA's budget is its sora sibling's final size: it waits while that cell is queued or running (and
    `main` drops it if that cell then has no result)."""
    return cell.budget_from is None or cell.budget_from not in waiting


def sized_by_missing(cell: Cell, records: dict[str, dict]) -> bool:
    """An AdaLoRA cell whose sora sibling has no result yet: it cannot be sized, so it must not run now."""
    return bool(cell.budget_from) and cell.budget_from not in records


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    records = {r["key"]: r for r in common.read_jsonl(args.results) if "key" in r}
    if not args.dry_run:  # the ranks of sora cells trained before the ranks were stored, while their runs exist
        patterns.backfill(records, Path(args.runs_dir), args.ranks)
    queue = []
    matrix = cells(args, records)
    searching = (args.lr_search == "per-task" and "lr" not in dict(s.split("=", 1) for s in args.set)
                 and args.lr_from_epochs is None)
    for variant in sorted({c.variant for c in matrix}, key=list(VARIANTS).index):
        lrs = sorted({dict(c.extra).get("lr", "shipped") for c in matrix
                      if c.variant == variant and not (searching and c.seed == lr.SEARCH_SEED)})
        print(f"lr    {variant}: {', '.join(lrs) or ('searching' if searching else 'shipped')}")
    for cell in matrix:
        if cell.key in records:
            print(f"skip  {cell.key} (done)")
        elif args.dry_run and sized_by_missing(cell, records):
            print(f"run   {cell.key}: once {cell.budget_from} is done, at its final size, "
                  f"lr {dict(cell.extra).get('lr', 'shipped')}")
        elif args.dry_run:
            print(f"run   {cell.key}: {shlex.join(command(cell, args, records)[0])}")
        else:
            queue.append(cell)
    failed, gave_up = 0, set()
    origin = common.provenance("bench.quality", argv)  # the code the cells run: taken before the first starts
    running: dict[Any, Cell] = {}
    deadline = None if args.start_within is None else time.monotonic() + 60 * args.start_within
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on `sora train` subprocesses
        while queue or running:
            if queue and deadline is not None and time.monotonic() > deadline:
                print(f"stop  --start-within {args.start_within:g} minutes passed: {len(queue)} cell(s) left for "
                      "the next run", flush=True)
                queue.clear()
                if not running:
                    break
            waiting = {c.key for c in queue} | {c.key for c in running.values()}
            for cell in [c for c in queue if ready(c, waiting) and sized_by_missing(c, records)]:
                queue.remove(cell)  # an AdaLoRA cell sized by default would keep its key: never run it so
                failed += 1
                gave_up.add(cell.key)
                print(f"FAIL  {cell.key}: its budget comes from {cell.budget_from}, which has no result", flush=True)
            for cell in [c for c in queue if ready(c, waiting)][: args.jobs - len(running)]:
                queue.remove(cell)
                print(f"train {cell.key} ...", flush=True)
                running[pool.submit(run_cell, cell, args, records)] = cell
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:  # results are appended here, by one thread only
                cell, record = running.pop(future), future.result()
                if record is None:
                    failed += 1
                    gave_up.add(cell.key)
                    print(f"FAIL  {cell.key}: see {Path(args.runs_dir) / (cell.key + '.log')}", flush=True)
                    continue
                record.update({**origin, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # command, commit, machine
                common.append_jsonl(args.results, record)
                records[cell.key] = record
                if cell.variant == patterns.SOURCE:
                    patterns.capture(cell.key, Path(args.runs_dir) / cell.key, args.ranks)
                main_metric = record["metrics"].get(MAIN_METRIC)
                print(f"done  {cell.key}: test {main_metric} {record['metrics'].get(TEST, {}).get(main_metric)}",
                      flush=True)
            if queue or deadline is None or time.monotonic() <= deadline:
                # A finished search plans its other seeds' cells: the queue is the matrix again, in its order.
                busy = {c.key for c in running.values()} | set(records) | gave_up
                queue = [c for c in cells(args, records) if c.key not in busy]
    for note in unplanned_notes(args, records):
        print(note)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
