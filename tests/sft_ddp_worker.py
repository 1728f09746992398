"""Run under torchrun by tests/test_distributed.py: `sora train ARGS...`, then every rank dumps its gates and
the metrics `train` returned to it.

Usage: sft_ddp_worker.py DUMP_DIR ARGS... (ARGS: the `sora` command line from `train` on).
"""

import sys
from pathlib import Path

import torch

import soralib
import soralib.train.run as run_module
from soralib.cli import main

dump_dir, argv = Path(sys.argv[1]), sys.argv[2:]
captured = {}
adapter_size, train = run_module.adapter_size, run_module.train


def spy(config, model):  # every rank calls it once, after training: record that rank's gates
    captured["gates"] = [g.detach().clone() for g in soralib.gate_parameters(model, trainable_only=False)]
    return adapter_size(config, model)


def train_spy(*args, **kwargs):
    captured["metrics"] = train(*args, **kwargs)
    return captured["metrics"]


run_module.adapter_size, run_module.train = spy, train_spy
code = main(argv)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(captured, dump_dir / f"rank{rank}.pt")
sys.exit(code)
