"""Speed benchmark: SoRA vs PEFT LoRA vs PEFT AdaLoRA on MiniLM, as `sora train` builds them.

    python -m bench.speed [--json] [--model minilm] [--steps N] [--blocks K] [--batch 32] [--seq 128]
                          [--out bench/results/speed.jsonl] [--force] [--tiny]

Measures (medians of per-step times over K interleaved blocks of N steps, a warm-up block discarded):
training step time, prox-step cost, peak training memory (RSS of one fresh subprocess per method), forward
latency (pruned SoRA vs LoRA at r_max, merged SoRA vs the bare model), achieved training FLOP/s against
this machine's fp32 matmul peak, and epoch time of length-grouped vs max-length padding. Appends one JSON
line to the results file; a cell already measured (same parameters, commit and machine) is skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from . import common
from . import workloads as w
from .speed_sft import measure_sft

METHODS = ("sora", "lora", "adalora")
PROBE_STEPS = 3  # the peak is reached by step 2: the optimizer state exists from the first step on
LABELS = {  # ratio key -> what it compares, for the printed table
    "sora_over_lora_step": "SoRA / LoRA training step time",
    "sora_over_adalora_step": "SoRA / AdaLoRA training step time",
    "sora_over_lora_memory": "SoRA / LoRA peak training memory (RSS)",
    "sora_over_lora_memory_above_base": "SoRA / LoRA memory above the loaded model",
    "merged_over_base_latency": "merged SoRA / bare model forward latency",
    "pruned_sora_over_lora_latency": "pruned SoRA / LoRA(r_max) forward latency",
    "matmul_peak_fraction": "achieved training FLOP/s / fp32 matmul peak",
    "padded_over_ours_epoch": "padded-to-max / length-grouped epoch time",
    "prox_fraction_of_step": "prox step / SoRA training step",
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--workload", choices=("glue", "sft"), default="glue",
                   help="glue: a BERT classifier (default); sft: a causal LM, SoRA against LoRA (bench/speed_sft.py)")
    p.add_argument("--model", help="pretrained model (default minilm; with --workload sft smollm2)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer BERT built from a config instead (smoke tests)")
    p.add_argument("--steps", type=int, default=10, help="steps per block (default 10)")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per method, after one warm-up block")
    p.add_argument("--batch", type=int, help="examples per step (default 32; with --workload sft 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example (and the padding bench's max length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square fp32 matmul for the peak")
    p.add_argument("--pad-examples", type=int, default=256, help="MRPC training rows of the padding bench")
    p.add_argument("--glue-dir", default=str(common.GLUE_DIR), help="GLUE TSV directory holding MRPC/")
    p.add_argument("--out", help="results JSONL to append to (default bench/results/speed.jsonl; with --workload "
                   "sft speed_sft.jsonl)")
    p.add_argument("--force", action="store_true", help="measure again even if this cell is in --out")
    p.add_argument("--memory-probe", choices=("base", *METHODS), help=argparse.SUPPRESS)  # internal: child mode
    args = p.parse_args(argv)
    args.model = args.model or ("smollm2" if args.workload == "sft" else "minilm")
    args.batch = args.batch or (4 if args.workload == "sft" else 32)
    args.out = args.out or str(common.RESULTS / ("speed_sft.jsonl" if args.workload == "sft" else "speed.jsonl"))
    if args.steps < 1 or args.blocks < 1:
        p.error("--steps and --blocks must be >= 1")
    return args


def params(args: argparse.Namespace) -> dict[str, Any]:
    if args.workload == "sft":
        return {"workload": "sft", "model": "tiny-llama" if args.tiny else args.model, "steps": args.steps,
                "blocks": args.blocks, "batch": args.batch, "seq": args.seq, "seed": args.seed, "r_max": w.R_MAX,
                "threshold": w.THRESHOLD}
    return {"model": "tiny-bert" if args.tiny else args.model, "steps": args.steps, "blocks": args.blocks,
            "batch": args.batch, "seq": args.seq, "seed": args.seed, "matmul_size": args.matmul_size,
            "pad_examples": args.pad_examples, "r_max": w.R_MAX, "threshold": w.THRESHOLD}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    common.quiet_libraries()
    if args.memory_probe:
        return memory_probe(args)
    record: dict[str, Any] = {"kind": "speed", "params": params(args), **common.provenance("bench.speed", argv)}
    m = record["machine"]
    record["key"] = "speed-" + common.short_hash([record["params"], record["commit"], record["dirty"], m["cores"],
                                                  m["threads"], m["torch"], m["platform"]])
    earlier = [r for r in common.read_jsonl(args.out) if r.get("key") == record["key"]]
    if earlier and not args.force:
        print(f"already measured (key {record['key']}); pass --force to measure again", file=sys.stderr)
        show(earlier[-1], args.json)
        return 0
    record.update(measure_sft(args, probe_memory) if args.workload == "sft" else measure(args))
    common.append_jsonl(args.out, record)
    show(record, args.json)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; returns medians (ms), memory (MB), FLOPs, ratios, targets and notes."""
    def base():
        return w.base_model(args.model, args.tiny, args.seed)

    notes = ["step medians over interleaved blocks; FLOPs by torch FlopCounterMode (forward+backward of one "
             "SoRA step, matmul-class ops); memory = peak RSS while training, one fresh process per method, "
             "high-water mark reset after loading"]
    first = base()
    batches = w.random_batches(args.steps, args.batch, args.seq, first.config.vocab_size, args.seed)

    # 1. Training steps, with the matmul peak interleaved in the same blocks.
    trainers = {m: w.StepRunner(m, w.adapted(m, first if m == "sora" else base()), batches) for m in METHODS}
    flops = trainers["sora"].flops_per_step()
    tasks = {m: t.step for m, t in trainers.items()}
    tasks["matmul"] = w.timed_matmul(args.matmul_size)
    times = w.interleave(tasks, args.steps, args.blocks)

    # 2. Padding: the same MRPC batches through SoRA, forward + backward, one epoch per block.
    pad = w.padding_batches(args.glue_dir, args.pad_examples, args.batch, args.seq, args.seed)
    if pad is None:
        notes.append(f"padding bench not run: no MRPC/train.tsv under {args.glue_dir}")
    else:
        sora = trainers["sora"].model
        times.update(w.interleave({"ours": w.timed_epoch(sora, pad[0]), "padded": w.timed_epoch(sora, pad[1])},
                                  1, args.blocks))
        del sora
    del trainers, tasks, first  # free the training models before the latency forms are built

    # 3. Forward latency (eval, no_grad) of the four deployment forms.
    forms = {"sora_pruned": w.half_gated_pruned_sora(base()), "lora": w.adapted("lora", base()),
             "sora_merged": w.half_gated_pruned_sora(base()).merge_and_unload(), "base": base()}
    times.update(w.interleave({f"latency_{k}": w.timed_forward(v, batches[0]) for k, v in forms.items()},
                              args.steps, args.blocks))
    del forms

    # 4. Peak memory: one fresh process per method, so no run inherits another's high-water mark.
    probes = probe_memory(args, ("base", *METHODS))
    memory = {m: p["train_peak_mb"] for m, p in probes.items()}

    med = {k: 1000 * common.median(v) for k, v in times.items()}  # milliseconds
    med["sora.optimizer_without_prox"] = med["sora.optimizer"] - med["sora.prox"]
    peak = 2 * args.matmul_size ** 3 / (med["matmul.matmul"] / 1000)
    achieved = flops / (med["sora.step"] / 1000)
    ratios = {
        "sora_over_lora_step": common.ratio(med["sora.step"], med["lora.step"]),
        "sora_over_adalora_step": common.ratio(med["sora.step"], med["adalora.step"]),
        "sora_over_lora_memory": common.ratio(memory["sora"], memory["lora"]),
        "sora_over_lora_memory_above_base": common.ratio(memory["sora"] - memory["base"],
                                                         memory["lora"] - memory["base"]),
        "merged_over_base_latency": common.ratio(med["latency_sora_merged.forward"], med["latency_base.forward"]),
        "pruned_sora_over_lora_latency": common.ratio(med["latency_sora_pruned.forward"],
                                                      med["latency_lora.forward"]),
        "matmul_peak_fraction": achieved / peak,
        "padded_over_ours_epoch": common.ratio(med.get("padded.epoch"), med.get("ours.epoch")),
        "prox_fraction_of_step": common.ratio(med["sora.prox"], med["sora.step"]),
    }
    return {"medians_ms": {k: round(v, 4) for k, v in sorted(med.items())},
            "memory_mb": memory, "memory_probes": probes,
            "flops": {"train_flops_per_step": flops, "achieved_flops_per_s": achieved,
                      "matmul_peak_flops_per_s": peak, "method": "FlopCounterMode"},
            "ratios": ratios, "targets": {k: common.TARGETS[k][0] for k in ratios if k in common.TARGETS},
            "met": {k: common.target_met(k, v) for k, v in ratios.items() if k in common.TARGETS}, "notes": notes}


def probe_memory(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Peak RSS (MB) of a fresh `python -m bench.speed --memory-probe METHOD` per method (tracemalloc misses
    torch's allocations). The probes run side by side: a process's own high-water mark does not depend on
    its neighbours, and the wall time is a fraction."""
    procs = {}
    for method in methods:
        cmd = [sys.executable, "-m", "bench.speed", "--memory-probe", method, "--workload", args.workload,
               "--model", args.model, "--steps",
               str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed)]
        procs[method] = subprocess.Popen(cmd + (["--tiny"] if args.tiny else []), cwd=common.REPO,
                                         env=common.python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    peaks = {}
    for method, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {method} failed:\n{err[-2000:]}")
        peaks[method] = json.loads(out.strip().splitlines()[-1])
    return peaks


def _proc_status_mb(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def memory_probe(args: argparse.Namespace) -> int:
    """Child mode: load the model and build the method, reset the RSS high-water mark, train `steps` steps
    (none for "base"), print the peaks as JSON.

    Loading weights has a transient peak higher than a small training step's; resetting the high-water mark
    (Linux: "5" into /proc/self/clear_refs) after loading makes "train_peak_mb" the peak of training itself,
    weights included (PROBE_STEPS steps). Where that is not possible it falls back to the whole process's
    ru_maxrss.
    """
    sft = args.workload == "sft"
    model = w.base_model(args.model, args.tiny, args.seed, args.workload)
    batches = w.random_batches(args.steps, args.batch, args.seq, model.config.vocab_size, args.seed, causal=sft)
    method = args.memory_probe
    trainer = None if method == "base" else w.StepRunner(method, w.adapted(method, model, "sft" if sft else ""),
                                                         batches)
    gc.collect()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = _proc_status_mb("VmHWM") is not None
    except OSError:
        reset = False
    before = _proc_status_mb("VmRSS")
    for _ in range(PROBE_STEPS if trainer else 0):
        trainer.step()
    scale = 2 ** 20 if sys.platform == "darwin" else 2 ** 10  # ru_maxrss: bytes on macOS, KiB on Linux
    process_peak = round(max(load_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / scale, 1)
    print(json.dumps({"method": args.memory_probe, "process_peak_mb": process_peak, "rss_before_train_mb": before,
                      "train_peak_mb": _proc_status_mb("VmHWM") if reset else process_peak, "hwm_reset": reset}))
    return 0


def show(record: dict[str, Any], as_json: bool) -> None:
    """Print the record: one JSON object, or a table of ratios with their targets."""
    if as_json:
        print(json.dumps(record, sort_keys=True))
        return
    p, m = record["params"], record["machine"]
    print(f"speed: {p['model']}, batch {p['batch']} x seq {p['seq']}, {p['blocks']} blocks x {p['steps']} steps, "
          f"{m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}")
    for key in sorted(record["ratios"], key=lambda k: list(LABELS).index(k) if k in LABELS else len(LABELS)):
        value = record["ratios"][key]
        target = record["targets"].get(key, "")
        met = {True: "met", False: "missed", None: ""}[record["met"].get(key)]
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"  {LABELS.get(key, key):<48} {shown:>8}  {target:<12} {met}")
    med = record["medians_ms"]
    steps = ", ".join(f"{m} {med[m + '.step']:.1f}" for m in METHODS if m + ".step" in med)
    print(f"  step ms: {steps}; prox {med['sora.prox']:.3f} ms; memory MB: {record['memory_mb']}")


if __name__ == "__main__":
    sys.exit(main())
