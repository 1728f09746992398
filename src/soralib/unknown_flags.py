"""The flag an unknown `sora` argument most likely meant, for argparse's "unrecognized arguments" message."""

from __future__ import annotations

import argparse
import difflib
import re

# Trainer's and PEFT's names for what `sora train` flags set: an unknown flag among them is named with ours
FAMILIAR = {"--learning-rate": "--lr", "--num-train-epochs": "--epochs", "--model-name-or-path": "--model",
            "--per-device-train-batch-size": "--batch-size", "--per-device-eval-batch-size": "--eval-batch-size",
            "--eval-steps": "--eval-fraction (a fraction of the steps: 0.1 evaluates every 10 %)",
            "--eval-strategy": "--eval-each-epoch or --eval-fraction", "--warmup-steps": "--warmup-ratio",
            "--lora-r": "--r", "--lora-rank": "--r"}


def unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's message for arguments no flag takes, naming the flag the first unknown one most likely meant."""
    # Trainer's own parser spells its flags with underscores (--learning_rate): read them as hyphens
    flag = next((a.split("=", 1)[0] for a in extra if a.startswith("--")), "").replace("_", "-")
    known = sorted(set(re.findall(r"--[a-z][a-z0-9-]*", parser.format_usage())))  # its own flags only
    # one begins the other (--over, --output for --out, not --report-to for --r): the nearest in length; else a
    # near spelling
    nested = [k for k in known if flag and (k.startswith(flag) or (flag.startswith(k) and len(flag) - len(k) <= 3))]
    close = difflib.get_close_matches(flag[2:], [k[2:] for k in known], n=1, cutoff=0.7)
    meant = FAMILIAR.get(flag) if parser.prog.endswith(" train") else None
    meant = meant or (min(nested, key=lambda k: abs(len(k) - len(flag))) if nested else
                      "--" + close[0] if close else None)
    return f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {meant}?" if meant else "")
