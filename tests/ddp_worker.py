"""Run under torchrun by tests/test_distributed.py: one SoRA training run, then every rank dumps its gates."""

import sys
from pathlib import Path

import torch

import soralib
import soralib.train.run as run_module
from soralib.train.config import build_config

glue_dir, model_dir, out_dir, dump_dir, batch = sys.argv[1:6]
config = build_config("sora", None, {
    "task": "rte", "model": model_dir, "data_dir": glue_dir, "output_dir": out_dir, "batch_size": batch,
    "max_steps": "6", "threshold": "0.01", "logging_steps": "2", "save_steps": "3", "warmup_ratio": "0",
    # plain random order: length grouping builds its mega-batches from the per-device batch size, so the
    # global batches of 2×4 and 1×8 would differ
    "group_by_length": "false",
})
captured = {}
adapter_size = run_module.adapter_size


def spy(config, model):  # every rank calls it once, after training: record that rank's gates
    captured["gates"] = [g.detach().clone() for g in soralib.gate_parameters(model, trainable_only=False)]
    return adapter_size(config, model)


run_module.adapter_size = spy
run_module.train(config)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(captured["gates"], Path(dump_dir) / f"gates-rank{rank}.pt")
