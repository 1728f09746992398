"""bench.speed's SFT workload (`python -m bench.speed --workload sft`): SoRA against PEFT LoRA on a causal LM.

SmolLM2-135M-Instruct (the offline GGUF, dequantized to fp32), all seven linear kinds of each block, r 8,
random token batches with the next-token loss on every position (batch × seq, default 4 × 128). The two
methods' steps are interleaved in blocks, after one warm-up block; peak memory is measured in one fresh
process per method (bench.speed's memory probes). Target: SoRA / LoRA step time ≤ 1.00.
"""

from __future__ import annotations

import copy
from typing import Any

from . import common
from . import workloads as w

METHODS = ("sora", "lora")
TARGET = ("≤ 1.00", lambda v: v <= 1.00)


def measure_sft(args, probe_memory) -> dict[str, Any]:
    """Medians (ms) of each method's training step, peak memory (MB) and the ratios, as bench.speed records."""
    first = w.base_model(args.model, args.tiny, args.seed, "sft")
    batches = w.random_batches(args.steps, args.batch, args.seq, first.config.vocab_size, args.seed, causal=True)
    second = copy.deepcopy(first)  # one load: SmolLM2's GGUF takes ~20 s to read
    trainers = {m: w.StepRunner(m, w.adapted(m, base, "sft"), batches) for m, base in zip(METHODS, (first, second))}
    times = w.interleave({m: t.step for m, t in trainers.items()}, args.steps, args.blocks)
    del trainers, first, second
    probes = probe_memory(args, ("base", *METHODS))
    memory = {m: p["train_peak_mb"] for m, p in probes.items()}
    med = {k: 1000 * common.median(v) for k, v in times.items()}
    ratios = {
        "sora_over_lora_step": common.ratio(med["sora.step"], med["lora.step"]),
        "sora_over_lora_memory": common.ratio(memory["sora"], memory["lora"]),
        "sora_over_lora_memory_above_base": common.ratio(memory["sora"] - memory["base"],
                                                         memory["lora"] - memory["base"]),
        "prox_fraction_of_step": common.ratio(med["sora.prox"], med["sora.step"]),
    }
    targets = {"sora_over_lora_step": TARGET[0], "sora_over_lora_memory": common.TARGETS["sora_over_lora_memory"][0]}
    met = {"sora_over_lora_step": TARGET[1](ratios["sora_over_lora_step"]),
           "sora_over_lora_memory": common.target_met("sora_over_lora_memory", ratios["sora_over_lora_memory"])}
    return {"medians_ms": {k: round(v, 4) for k, v in sorted(med.items())}, "memory_mb": memory,
            "memory_probes": probes, "ratios": ratios, "targets": targets, "met": met,
            "notes": ["SFT workload: causal-LM next-token loss on random tokens; step medians over interleaved "
                      "blocks; memory = peak RSS while training, one fresh process per method"]}
