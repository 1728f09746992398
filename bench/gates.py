"""Which ranks a fixed-threshold SoRA run keeps, against what its initial gates alone predict.

    python -m bench.gates [--results bench/results/quality.jsonl] [--runs-dir bench/runs] [--out FILE]

The prox step takes ξ off every gate at every step (T steps in all), so a gate the gradient never pushes is
zero at the end exactly when |g0| ≤ ξ·T. For each finished quality cell of the fixed-ξ `sora` variant whose
run directory is at hand, this rebuilds the initial gates g0 (`sora train` seeds torch right before it wraps
the model, so the run's config rebuilds the same g0), reads the final gates from `sora_adapter/`, and counts
the ranks alive at the end, the ranks with |g0| > ξ·T, and how often the two agree. Agreement near 1 says
the threshold's running total chose the ranks, not the data. One line per cell goes to `--out`; a cell
already there is skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from soralib.train.rundir import CONFIG, SKIPPED_STEPS, SORA_ADAPTER, STEPS

from . import common


def initial_and_final_gates(run_dir: Path) -> tuple[Any, ...]:
    """(config, g0, g_final, size, sizes, costs): the run's config, its gates before and after training and each
    rank's contribution to ΔW at the end (one flat tensor each, in the same module order), each module's rank count
    and its cost per rank (in + out)."""
    import torch
    from safetensors.torch import load_file

    from soralib.optim import sora_layers
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap
    from soralib.train.run import seed_everything
    from soralib.train.tasks import get_task

    config = build_config("sora", str(run_dir / CONFIG), {})
    model, _, _ = load_base(config, get_task(config.task).num_labels)
    seed_everything(config.seed)  # as `sora train` does just before wrapping: the same g0
    model = wrap(config, model, total_steps=1)
    final = load_file(str(run_dir / SORA_ADAPTER / "adapter_model.safetensors"))
    layers = list(sora_layers(model))
    g0 = torch.cat([layer.sora_gate["default"].detach().flatten() for _, layer in layers])
    g_final = torch.cat([final[f"{name}.sora_gate"].flatten() for name, _ in layers])
    # what each rank adds to ΔW, |g|·‖A row‖·‖B column‖: a rank kept with a near-zero gate does nothing
    size = torch.cat([final[f"{name}.sora_gate"].abs() * final[f"{name}.sora_A.weight"].norm(dim=1)
                      * final[f"{name}.sora_B.weight"].norm(dim=0) for name, _ in layers])
    sizes = [layer.sora_gate["default"].numel() for _, layer in layers]
    return config, g0, g_final, size, sizes, [layer.in_features + layer.out_features for _, layer in layers]


def predicted_alive(config: Any, g0: Any, sizes: list[int], costs: list[int], steps: int) -> Any:
    """Which ranks g0 alone would keep: abs(g0) > ξ·T for one fixed ξ; for a budget, the ranks its trim keeps
    when applied to abs(g0) (the largest initial gates that fit, each module keeping min_rank); None where
    g0 cannot decide (every gate starts equal, or a schedule, lr-scaled threshold or L1 term acts)."""
    import torch

    from soralib.budget import trim_to_budget

    if config.gate_init == "ones" or config.schedule or config.thresholds or config.l1_coef:
        return None
    if config.target_rank or config.target_params:
        budget = config.target_params or config.target_rank * len(sizes)
        masks = trim_to_budget(list(g0.split(sizes)), costs if config.target_params else [1] * len(sizes),
                               budget, config.effective_min_rank())
        return torch.cat(masks)
    if config.threshold_mode != "fixed" or config.effective_min_rank():
        return None
    return g0.abs() > config.threshold * steps


def measure(key: str, run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The record of one cell (T = its optimizer steps that ran: a skipped step has no prox step either):
    alive ranks against what g0 alone predicts (`predicted_alive`); for gates that all start equal only the
    alive count and the agreement a random kept set of that size would have with any other (`chance`)."""
    config, g0, g_final, size, sizes, costs = initial_and_final_gates(run_dir)
    if config.schedule or config.thresholds or config.l1_coef:
        return None
    alive, predicted = g_final != 0, predicted_alive(config, g0, sizes, costs, steps)
    a = float(alive.float().mean())
    p = a if predicted is None else float(predicted.float().mean())
    record = {"kind": "gates", "key": key, "task": config.task, "seed": config.seed, "steps": steps,
              "threshold": config.threshold, "xi_T": config.threshold * steps, "ranks": len(g0),
              "alive": int(alive.sum()), "gate_init": config.gate_init,
              # kept, yet adding under 1 % of what the largest rank adds: a size met with ranks that do nothing
              "idle": int((alive & (size < 0.01 * float(size.max()))).sum()),
              "rule": "budget" if config.target_rank or config.target_params else "fixed",
              # the same-verdict share of two independent random draws with these shares alive
              "chance": round(a * p + (1 - a) * (1 - p), 4)}
    if predicted is not None:
        record.update(predicted=int(predicted.sum()), agree=int((alive == predicted).sum()),
                      alive_not_predicted=int((alive & ~predicted).sum()),
                      predicted_not_alive=int((~alive & predicted).sum()))
    return record


def table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of the gates records (none: nothing)."""
    rows = [r for r in records if r.get("kind") == "gates"]
    if not rows:
        return []
    lines = ["### Which ranks a SoRA run keeps, against what its initial gates alone predict (`python -m bench.gates`)",
             "", "Prediction: abs(g0) > ξ·T for a fixed ξ; for a budget, the ranks its trim keeps applied to abs(g0); "
             "none when every gate starts at 1. \"Chance\" is the agreement of two random kept sets of this size: "
             "a same-verdict share near it means g0 decides nothing, near 100 % that g0 decides everything. "
             "A budget run's floor is its frozen-gates twin (`sora-budget-static`), not 100 %: where the ramp cuts a "
             "few ranks past the budget, the hold phase refills it with dead gates AdamW revives at about the gate "
             "lr, which g0 did not choose. \"Idle\": ranks alive that add under 1 % of what the run's largest rank "
             "adds to ΔW (abs(g)·‖A row‖·‖B column‖): kept in the count, doing nothing.", "",
             "| cell | rule | gate init | steps T | ξ·T | ranks alive | idle | predicted alive | same verdict | "
             "chance | alive, not predicted | predicted, dead |", "|---" * 12 + "|"]
    for r in sorted(rows, key=lambda r: r["key"]):
        def share(k: str) -> str:
            return f"{r[k] / r['ranks']:.1%}" if k in r else "–"
        chance = f"{r['chance']:.1%}" if "chance" in r else "–"  # records older than the column
        lines.append(f"| {r['key']} | {r.get('rule', 'fixed')} | {r.get('gate_init', 'randn')} | {r['steps']} | "
                     f"{r['xi_T']:.2f} | {share('alive')} | {share('idle')} | {share('predicted')} | "
                     f"{share('agree')} | {chance} | {r.get('alive_not_predicted', '–')} | "
                     f"{r.get('predicted_not_alive', '–')} |")
    return lines + [""]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.gates", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(common.RESULTS / "quality.jsonl"), help="quality results JSONL")
    p.add_argument("--runs-dir", default=str(common.RUNS), help="where the run directories are")
    p.add_argument("--out", default=str(common.RESULTS / "gates.jsonl"), help="gates results JSONL")
    args = p.parse_args(argv)
    done = common.done_keys(args.out)
    origin = common.provenance("bench.gates", argv)
    for r in common.read_jsonl(args.results):
        run_dir = Path(args.runs_dir) / r["key"]
        if not r.get("variant", "").startswith("sora") or r["key"] in done:
            continue
        if not (run_dir / SORA_ADAPTER).is_dir():
            print(f"skip  {r['key']}: no run directory {run_dir} here")
            continue
        steps = r["metrics"][STEPS] - r["metrics"].get(SKIPPED_STEPS, 0)
        record = measure(r["key"], run_dir, steps)
        if record is None:
            print(f"skip  {r['key']}: a schedule or an L1 term decides with the threshold")
            continue
        # g0 is rebuilt by today's code: the cell's own commit is kept beside it, to spot an init that changed
        record.update(origin, cell_commit=r.get("commit"))
        common.append_jsonl(args.out, record)
        done.add(r["key"])
        print(f"done  {r['key']}: {record.get('agree', '–')} of {record['ranks']} ranks as g0 alone predicts "
              f"(chance {record['chance']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
