"""What --resume checks and does beyond test_crash: it refuses data changed since the run started, and a run
resumed from its last checkpoint (training done, results not yet written) trains no further step."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import history_lines, train_args
from soralib.cli import main

# 16 rows in batches of 4: 4 steps per epoch, and --max-steps 3 ends the run inside its first epoch.
MID_EPOCH = ["--max-train-samples", "16", "--batch-size", "4", "--max-steps", "3", "--logging-steps", "1",
             "--eval-each-epoch", "true"]
SAVES = {"every step": ["--save-steps", "1"], "each epoch": []}  # the last checkpoint: at the step's or the epoch's end


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
    assert history_lines(run) == history_lines(straight)  # no step 4, no evaluation done twice
    assert not (run / "checkpoints" / "stage-1" / "checkpoint-4").exists()
    ta, tb = (load_file(str(d / "sora_adapter" / "adapter_model.safetensors")) for d in (straight, run))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _custom_run(tmp_path: Path) -> tuple[Path, list[str]]:
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text("q,y\n" + "".join(f"w{i} x,{'yes' if i % 3 else 'no'}\n" for i in range(16)))
    out = tmp_path / "run"
    return out, ["train", "--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                 str(tmp_path / "dev.csv"), "--text-columns", "q", "--label-column", "y", "--model", "MODEL",
                 "--output-dir", str(out), "--max-steps", "2", "--save-steps", "1", "--batch-size", "4"]


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".sora.lock"}


@pytest.mark.parametrize("split", ["train", "validation"])
def test_resume_after_the_data_changed_is_refused_before_anything_is_written(tiny_model, tmp_path, capsys, split):
    out, args = _custom_run(tmp_path)
    args[args.index("MODEL")] = str(tiny_model)
    assert main(args) == 0
    (out / "metrics.json").unlink()  # as if killed before its last write
    file = tmp_path / ("train.csv" if split == "train" else "dev.csv")
    file.write_text(file.read_text().replace("w4 x,yes", "w4 x,no"))  # one label corrected
    before = _files(out)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"sora train: error: cannot resume {out}: its {split} rows differ from the ones the run started "
                   "with (the data changed since); restore that data, or start the run again with --overwrite")
    assert _files(out) == before


def test_resume_with_the_same_data_checks_it_and_finishes(tiny_model, tmp_path):
    out, args = _custom_run(tmp_path)
    args[args.index("MODEL")] = str(tiny_model)
    assert main(args) == 0
    assert set(json.loads((out / "state.json").read_text())["data_rows"]) == {"train", "validation"}
    (out / "metrics.json").unlink()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
