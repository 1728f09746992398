"""How far the data alone moves the gates: plain SGD on them (the paper's proximal gradient step) against the
optimizer's AdamW step, side by side in one run.

    python -m bench.motion [--task mrpc] [--seed 0] [--epochs 3] [--lr 8e-4] [--gate-lr X] [--updates sgd,optimizer]
                           [--model minilm] [--data-dir DIR] [--runs-dir bench/runs] [--out bench/results/motion.jsonl]

A proximal step shares one τ among all gates, so it can only separate ranks the gradient has moved apart: a
gate is cut when its running total of shrinkage passes what the gradient gave it. Every gate here starts at 1
and no threshold is set (`--gate-init ones --threshold 0`), so g − 1 at the end is what the gradient did, in
float32: at 1 a step under half its spacing (~6e-8) is lost, so a gate's true pull is at most |g − 1| plus
steps × 6e-8. With `threshold_mode="lr_scaled"` the paper's τ = η_t·λ shrinks every gate by λ·Ση_t in all; a kept
set the data decides needs a spread of g − 1 that is not small against that total. Each update runs as a
`sora train` run in `--runs-dir` (an existing finished run is reused); one line with both goes to `--out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from soralib.train.rundir import METRICS, SORA_ADAPTER

from . import common

UPDATES = ("sgd", "optimizer")


def train_argv(args: argparse.Namespace, update: str, run_dir: Path) -> list[str]:
    """`sora train` for one gate update: gates from 1, no threshold, the quality matrix's protocol and split."""
    argv = ["train", "--method", "sora", "--r", "8", "--gate-init", "ones", "--threshold", "0", "--gate-update",
            update, "--task", args.task, "--model", args.model, "--protocol", "paper", "--split-seed", "0",
            "--seed", str(args.seed), "--epochs", str(args.epochs), "--lr", str(args.lr), "--output-dir", str(run_dir)]
    return argv + (["--gate-lr", str(args.gate_lr)] if args.gate_lr else []) + (
        ["--data-dir", args.data_dir] if args.data_dir else [])


def motion(run_dir: Path) -> dict[str, Any]:
    """The spread of g − 1 over every gate of a finished run, and its score."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / SORA_ADAPTER / "adapter_model.safetensors"))
    moved = torch.cat([v.flatten() for k, v in sorted(weights.items()) if k.endswith("sora_gate")]).double() - 1
    q = torch.quantile(moved, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    return {"gates": moved.numel(), "max_abs": moved.abs().max().item(), "mean_abs": moved.abs().mean().item(),
            "q01": q[0], "q50": q[1], "q99": q[2], "steps": metrics.get("steps"),
            "test": metrics.get("test", {}).get(metrics.get("main_metric", ""))}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.motion", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="mrpc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=8e-4, help="lr of A, B and (unless --gate-lr) the gates")
    p.add_argument("--gate-lr", type=float, default=None)
    p.add_argument("--updates", default=",".join(UPDATES), help=f"gate updates to compare, of {', '.join(UPDATES)}")
    p.add_argument("--data-dir", default=str(common.GLUE_DIR) if common.GLUE_DIR.is_dir() else None)
    p.add_argument("--runs-dir", default=str(common.RUNS))
    p.add_argument("--out", default=str(common.RESULTS / "motion.jsonl"))
    p.add_argument("--model", default="minilm", help="a model name of sora train, or a model directory")
    args = p.parse_args(argv)
    updates = args.updates.split(",")
    if not updates or any(u not in UPDATES for u in updates):
        p.error(f"--updates must be a comma-separated subset of {', '.join(UPDATES)}, got {args.updates!r}")
    record = {"kind": "motion", **common.provenance("bench.motion", argv), "task": args.task, "seed": args.seed,
              "model": args.model, "epochs": args.epochs, "lr": args.lr, "gate_lr": args.gate_lr, "updates": {}}
    for update in updates:
        tag = common.short_hash([args.lr, args.gate_lr, args.model])
        run_dir = Path(args.runs_dir) / f"motion-{args.task}-{update}-s{args.seed}-e{args.epochs:g}-{tag}"
        if not (run_dir / METRICS).is_file():
            cmd = train_argv(args, update, run_dir)
            print(f"train {run_dir.name} ...", flush=True)
            done = subprocess.run([sys.executable, "-m", "soralib.cli", *cmd], cwd=common.REPO,
                                  env=common.python_env(), capture_output=True, text=True)
            if done.returncode != 0:
                print(f"FAIL  {run_dir.name}: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
                return 1
        record["updates"][update] = motion(run_dir)
        print(f"done  {update}: max |g - 1| {record['updates'][update]['max_abs']:.3g}", flush=True)
    common.append_jsonl(args.out, record)
    return 0


def table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the motion records (none: nothing)."""
    rows = [r for r in records if r.get("kind") == "motion"]
    if not rows:
        return []
    lines = ["### How far the data moves gates that start at 1, with no threshold (`python -m bench.motion`)", "",
             "g − 1 at the end of training is all the gradient did (in float32: at 1 a step under ~6e-8 is lost, "
             "so add steps × 6e-8 for a bound); a shared τ can only separate gates this spread apart. Quantiles over "
             "every gate of the model.", "",
             "| task | seed | epochs | lr | gate lr | gate update | steps | max abs(g − 1) | mean abs(g − 1) | "
             "1 % / 50 % / 99 % of g − 1 | test score |", "|---" * 11 + "|"]
    for r in rows:
        for update, m in r["updates"].items():
            test = "–" if m.get("test") is None else f"{100 * m['test']:.2f}"
            lines.append(f"| {r['task']} | {r['seed']} | {r['epochs']:g} | {r['lr']:g} | {r['gate_lr'] or 'lr'} | "
                         f"{update} | {m['steps']} | {m['max_abs']:.3g} | {m['mean_abs']:.3g} | "
                         f"{m['q01']:.3g} / {m['q50']:.3g} / {m['q99']:.3g} | {test} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
