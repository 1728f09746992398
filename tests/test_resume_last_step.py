"""A run killed after its last checkpoint (training done, results not yet written) resumes without training more:
--resume then only writes what the straight run wrote after that checkpoint."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_args
from soralib.cli import main

# 16 rows in batches of 4: 4 steps per epoch, and --max-steps 3 ends the run inside its first epoch.
MID_EPOCH = ["--max-train-samples", "16", "--batch-size", "4", "--max-steps", "3", "--logging-steps", "1",
             "--eval-each-epoch", "true"]
SAVES = {"every step": ["--save-steps", "1"], "each epoch": []}  # the last checkpoint: at the step's end, at the epoch's


def _history(run: Path) -> list[dict]:
    """history.jsonl without what the clock decides, and without the end-of-call train_loss (see test_crash)."""
    lines = (json.loads(x) for x in (run / "history.jsonl").read_text().splitlines())
    return [{k: v for k, v in x.items() if k != "train_loss" and not any(t in k for t in ("seconds", "runtime",
                                                                                         "per_second"))}
            for x in lines]


@pytest.mark.parametrize("saves", SAVES)
def test_a_run_resumed_from_its_last_checkpoint_trains_no_further_step(glue_dir, tiny_model, tmp_path, saves):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, straight, *MID_EPOCH, *SAVES[saves])) == 0
    last = straight / "checkpoints" / "stage-1" / "checkpoint-3"
    assert last.is_dir()
    shutil.copytree(last, run / last.relative_to(straight))
    for file in ("config.yaml", "history.jsonl"):  # as if killed right after that checkpoint: its log runs on
        shutil.copy(straight / file, run / file)
    assert main(train_args(glue_dir, tiny_model, run, *MID_EPOCH, *SAVES[saves], "--resume")) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert b["steps"] == a["steps"] == 3 and b["eval"] == a["eval"]
    assert _history(run) == _history(straight)  # no step 4, no evaluation done twice
    assert not (run / "checkpoints" / "stage-1" / "checkpoint-4").exists()
    ta, tb = (load_file(str(d / "sora_adapter" / "adapter_model.safetensors")) for d in (straight, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
