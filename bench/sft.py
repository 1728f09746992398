"""SFT quality cells: SmolLM2 on GSM8K, SoRA with a budget against LoRA r8 and LoRA at the budget's size.

    python -m bench.sft [--seeds 0,1] [--steps 50] [--jobs 2] [--dry-run]   # run the missing cells, then the table
    python -m bench.sft --table                                              # the table of the stored records only

Every cell is one `sora train --task sft` run with the same data, steps, batch and learning rate (one lr for
all methods: no per-method search at this cost), validation loss on the same validation rows every
--eval-fraction of training, and exact match of greedy generations on the same first --generate-samples
validation prompts.
One line per finished cell goes to bench/results/sft.jsonl; the run directories to bench/runs/.
`--jobs N` runs N cells at once, each with cores // N torch threads (on 2 cores two one-thread cells finish
sooner than two two-thread cells in turn); the wall time of a cell depends on it, its scores do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from soralib.train.rundir import CONFIG, EVAL, HISTORY, KEPT_PARAMS, METRICS

from . import claims, common

# variant -> (method, overrides): the budget is a mean rank of 4 of r_max 8, lora-equal LoRA r4 at the same
# scale alpha / r = 2 (its size is closest to the budget's), lora the r_max rank without a budget.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sora-budget": ("sora", {"r": 8, "target_rank": 4}),
    "lora": ("lora", {"r": 8}),
    "lora-equal": ("lora", {"r": 4, "lora_alpha": 8}),
}
GSM8K = common.REPO.parent / "shared" / "data" / "gsm8k"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(VARIANTS), help="variants among " + ", ".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of every cell")
    p.add_argument("--eval-fraction", type=float, default=0.5, help="validation loss every this fraction of steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--lr", default="8e-4", help="one learning rate for every method")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=64, help="validation rows (the first of test.jsonl)")
    p.add_argument("--generate-samples", type=int, default=50, help="exact match on the first N validation rows")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=str(GSM8K), help="folder with train.jsonl and test.jsonl")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each with cores // jobs threads")
    p.add_argument("--start-within", type=float, metavar="MINUTES", help="start no cell after this many minutes")
    p.add_argument("--results", default=str(common.RESULTS / "sft.jsonl"))
    p.add_argument("--runs-dir", default=str(common.RUNS))
    p.add_argument("--dry-run", action="store_true", help="list the cells and their commands; run nothing")
    p.add_argument("--table", action="store_true", help="print the table of the stored records; run nothing")
    args = p.parse_args(argv)
    unknown = [v for v in args.methods.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
    if not 1 <= args.jobs <= (os.cpu_count() or 1):
        p.error(f"--jobs {args.jobs}: allowed 1 to the number of cores ({os.cpu_count()})")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every cell shares: part of each cell's key, so other settings never mix in one table."""
    return {"model": args.model, "steps": args.steps, "batch": args.batch, "max_length": args.max_length,
            "lr": args.lr, "eval_fraction": args.eval_fraction, "train_samples": args.train_samples,
            "eval_samples": args.eval_samples, "generate_samples": args.generate_samples,
            "data": Path(args.data_dir).name}


def key(variant: str, seed: int, args: argparse.Namespace) -> str:
    return f"sft-{variant}-s{seed}-{common.short_hash(settings(args))}"


def command(variant: str, seed: int, args: argparse.Namespace) -> list[str]:
    method, overrides = VARIANTS[variant]
    data = Path(args.data_dir)
    flags = {**overrides, "task": "sft", "model": args.model, "seed": seed, "max_steps": args.steps,
             "batch_size": args.batch, "max_length": args.max_length, "lr": args.lr,
             "train_file": data / "train.jsonl", "validation_file": data / "test.jsonl",
             "prompt_column": "question", "completion_column": "answer", "max_train_samples": args.train_samples,
             "max_eval_samples": args.eval_samples, "max_generate_samples": args.generate_samples,
             "eval_fraction": args.eval_fraction, "output_dir": Path(args.runs_dir) / key(variant, seed, args)}
    argv = [sys.executable, "-m", "soralib.cli", "train", "--method", method]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def run_cell(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    argv = command(variant, seed, args)
    run = Path(args.runs_dir) / key(variant, seed, args)
    if (run / CONFIG).is_file() and not (run / METRICS).is_file():
        argv.append("--resume")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    started = time.perf_counter()
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.log", "a") as log:
        done = subprocess.run(argv, cwd=common.REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0 or not (run / METRICS).is_file():
        return None
    lines = common.read_jsonl(run / HISTORY)
    curve = {r["step"]: r["eval_loss"] for r in lines if r.get("split") == "validation" and "eval_loss" in r}
    return {"kind": "sft", "key": run.name, "variant": variant, "seed": seed, "settings": settings(args),
            "metrics": json.loads((run / METRICS).read_text()), "validation_loss": sorted(curve.items()),
            "wall_seconds": round(time.perf_counter() - started, 1), "jobs": args.jobs, "threads": threads,
            "run_command": f"OMP_NUM_THREADS={threads} {shlex.join(argv)}",
            **common.provenance("bench.sft", sys.argv[1:])}


def table(records: list[dict[str, Any]]) -> list[str]:
    """Per variant: validation loss and exact match, means over seeds; the gain over lora-equal (its loss minus
    the variant's: positive is better) paired by seed, with a 95 % t interval and the verdict of bench.claims."""
    by = {(r["variant"], r["seed"]): r["metrics"] for r in records}
    variants = [v for v in VARIANTS if any(k[0] == v for k in by)]
    out = ["| variant | seeds | kept params | validation loss | exact match | loss gain over lora-equal (95 % t) |",
           "|---|---|---|---|---|---|"]
    for v in variants:
        seeds = sorted(s for (w, s) in by if w == v)
        mean = {m: sum(by[v, s][EVAL].get(m, 0.0) for s in seeds) / len(seeds) for m in ("loss", "exact_match")}
        both = [s for s in seeds if ("lora-equal", s) in by]
        gain = claims.t_interval([by["lora-equal", s][EVAL]["loss"] - by[v, s][EVAL]["loss"] for s in both])
        shown = "" if v == "lora-equal" or gain is None else \
            f"{gain[0]:+.4f} [{gain[1]:+.4f}, {gain[2]:+.4f}] ({claims.verdict(gain, len(both))})"
        out.append(f"| {v} | {len(seeds)} | {by[v, seeds[0]].get(KEPT_PARAMS, 0):,} | {mean['loss']:.4f} | "
                   f"{mean['exact_match']:.3f} | {shown} |")
    return out


def section(records: list[dict[str, Any]]) -> list[str]:
    """bench/README.md's SFT part: per setting, the table, the validation loss at each evaluated step (mean over
    seeds) and where the numbers came from."""
    lines = ["## SFT: SmolLM2 on GSM8K (`python -m bench.sft`)", ""]
    cells = [r for r in records if r.get("kind") == "sft"]
    if not cells:
        return lines + ["Not yet measured.", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in cells:
        groups.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(r)
    for group in groups.values():
        s, first = group[0]["settings"], group[0]
        lines += [f"### {s['model']} on {s['data']}: {s['steps']} steps of batch {s['batch']} (≤ {s['max_length']} "
                  f"tokens), lr {s['lr']}, {s['train_samples']} training rows, validation loss on {s['eval_samples']} "
                  f"rows, exact match on {s['generate_samples']}", "",
                  f"commit `{(first.get('commit') or '?')[:12]}`; {first.get('jobs', 1)} cell(s) at a time × "
                  f"{first.get('threads')} thread(s); mean wall time per cell "
                  f"{sum(r['wall_seconds'] for r in group) / len(group) / 60:.0f} min", ""]
        lines += table(group) + ["", "| variant | " + " | ".join(f"loss at step {step}" for step, _ in
                                                                    first["validation_loss"]) + " |",
                                 "|---|" + "---|" * len(first["validation_loss"])]
        for v in [v for v in VARIANTS if any(r["variant"] == v for r in group)]:
            curves = [dict(r["validation_loss"]) for r in group if r["variant"] == v]
            lines.append(f"| {v} | " + " | ".join(f"{sum(c.get(step, float('nan')) for c in curves) / len(curves):.4f}"
                                                  for step, _ in first["validation_loss"]) + " |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    cells = [(v, int(s)) for s in args.seeds.split(",") for v in args.methods.split(",")]
    done = {r["key"] for r in common.read_jsonl(args.results)}
    todo = []
    for variant, seed in cells if not args.table else []:
        name = key(variant, seed, args)
        if name in done:
            print(f"skip  {name} (done)")
        elif args.dry_run:
            print(f"run   {name}: {shlex.join(command(variant, seed, args))}")
        else:
            todo.append((variant, seed))
    started, lock = time.monotonic(), threading.Lock()

    def one(cell: tuple[str, int]) -> None:  # a pool thread only waits on its `sora train` subprocess
        name = key(*cell, args)
        if args.start_within is not None and time.monotonic() - started > 60 * args.start_within:
            print(f"stop  {name}: --start-within {args.start_within:g} min passed", flush=True)
            return
        record = run_cell(*cell, args)
        print(f"{'done' if record else 'FAIL'}  {name}", flush=True)
        if record:
            with lock:  # two cells may finish together: one rewrite of the file at a time
                common.append_jsonl(args.results, record)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    records = [r for r in common.read_jsonl(args.results) if r.get("settings") == settings(args)]
    if records:
        print("\n".join(table(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
