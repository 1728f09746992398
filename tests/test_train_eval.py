"""What `sora train` evaluates: validation points during training (each epoch or every fraction of it), a
regression task's metrics, a custom CSV task with its report, and the paper protocol's validation and test halves."""

import json
import random

import pytest

from conftest import _sentence, train_args
from soralib.cli import main
from soralib.errors import InputError
from soralib.train.config import build_config

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


def test_eval_each_epoch_writes_a_validation_curve_with_elapsed_time(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--eval-each-epoch", "true")) == 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    evals = [h for h in history if h.get("split") == "validation"]
    assert len(evals) == 2 and all("eval_accuracy" in h for h in evals)  # after epoch 1 and epoch 2
    assert evals[0]["step"] < evals[1]["step"] and 0 < evals[0]["elapsed_seconds"] < evals[1]["elapsed_seconds"]
    final = [h for h in history if "validation_accuracy" in h]
    assert len(final) == 1 and "split" not in final[0]  # the final evaluation, told apart by its prefix


def _validation_passes(monkeypatch) -> list[str]:
    """The prefixes of the evaluation passes Trainer runs from now on."""
    import transformers

    passes, loop = [], transformers.Trainer.evaluation_loop

    def counted(self, *args, **kwargs):
        passes.append(kwargs.get("metric_key_prefix", args[-1] if len(args) > 4 else "eval"))
        return loop(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluation_loop", counted)
    return passes


def test_the_final_validation_reuses_the_last_steps_evaluation_of_the_same_weights(glue_dir, tiny_model, tmp_path,
                                                                                   monkeypatch):
    passes = _validation_passes(monkeypatch)
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--eval-each-epoch", "true")) == 0
    assert passes == ["eval", "eval"]  # after epoch 1 and 2; none repeats the second for metrics.json
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    last = [h for h in history if h.get("split") == "validation"][-1]
    final = json.loads((out / "metrics.json").read_text())["eval"]
    assert final["accuracy"] == last["eval_accuracy"] and final["loss"] == last["eval_loss"]


def test_the_final_validation_runs_again_when_the_weights_changed_after_the_last_evaluation(
        glue_dir, tiny_model, tmp_path, monkeypatch):
    import torch

    from soralib.train import run

    def trim_that_moves_a_gate(model, *args):  # the budget's trim runs after training, before the final evaluation
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "gate" in n)[0] += 1.0

    monkeypatch.setattr(run, "trim_model_", trim_that_moves_a_gate)
    passes = _validation_passes(monkeypatch)
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, "--eval-each-epoch", "true", "--target-rank", "2")) == 0
    assert passes == ["eval", "eval", "validation"]


def test_eval_fraction_writes_a_validation_point_every_tenth_of_training(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    # 48 rows, batch 8, 2 epochs: 12 steps; every 0.25 of them is every 3 steps
    assert main(train_args(glue_dir, tiny_model, out, "--eval-fraction", "0.25")) == 0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h.get("split") == "validation"] == [3, 6, 9, 12]
    with pytest.raises(InputError, match="eval_fraction must be in"):
        build_config("sora", None, {"eval_fraction": 1.5})
    with pytest.raises(InputError, match="give eval_each_epoch or eval_fraction, not both"):
        build_config("sora", None, {"eval_fraction": 0.1, "eval_each_epoch": True})


def test_regression_task_reports_pearson_and_spearman(glue_dir, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(glue_dir, tiny_model, out, task="stsb")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"pearson", "spearmanr"} <= set(metrics["eval"]) and metrics["main_metric"] == "pearson"


def test_custom_csv_task_trains_and_a_report_is_written(tiny_model, tmp_path, capsys):
    rng = random.Random(1)
    for name, n in (("train.csv", 40), ("dev.jsonl", 16)):
        rows = [{"q": _sentence(rng), "a": _sentence(rng, 3), "y": rng.choice(["yes", "no", "maybe"])} for _ in range(n)]
        path = tmp_path / name
        if name.endswith(".csv"):
            path.write_text("q,a,y\n" + "".join(f"{r['q']},{r['a']},{r['y']}\n" for r in rows))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
            str(tmp_path / "dev.jsonl"), "--text-columns", "q,a", "--label-column", "y", "--model", str(tiny_model),
            "--output-dir", str(out), "--epochs", "1", "--batch-size", "8"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "custom" and "accuracy" in metrics["eval"] and metrics["num_labels"] == 3
    assert metrics["label_names"] == ["maybe", "no", "yes"]  # the head's outputs, in order
    assert main(["report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "custom" in report and (out / "report" / "kept_rank_heatmap.png").is_file()


def test_eval_of_a_custom_run_whose_training_file_changed_classes_is_refused(tiny_model, tmp_path, capsys):
    # the classes are re-read from the file: a class added since training shifted the ids under the trained head
    for name, labels in (("train.csv", ["no", "yes"] * 8), ("dev.csv", ["no", "yes"] * 2)):
        (tmp_path / name).write_text("q,y\n" + "".join(f"w{i} x,{y}\n" for i, y in enumerate(labels)))
    out = tmp_path / "run"
    assert main(["train", "--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                 str(tmp_path / "dev.csv"), "--text-columns", "q", "--label-column", "y", "--model", str(tiny_model),
                 "--output-dir", str(out), "--max-steps", "1"]) == 0
    with open(tmp_path / "train.csv", "a") as f:
        f.write("w99 x,maybe\n")
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert f"sora eval: error: {out}: the classes changed since training: trained on no, yes; the data now gives " \
           "maybe, no, yes; restore the training file the run was trained on" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["paper", "default"])
def test_eval_of_a_run_whose_evaluation_rows_changed_is_refused(tiny_model, tmp_path, capsys, protocol):
    # the paper protocol cuts the validation file into halves by a seeded shuffle: a row added moves both halves
    for name, n in (("train.csv", 16), ("dev.csv", 8)):
        (tmp_path / name).write_text("q,y\n" + "".join(f"w{i} x,{'no yes'.split()[i % 2]}\n" for i in range(n)))
    out = tmp_path / "run"
    assert main(["train", "--task", "custom", "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                 str(tmp_path / "dev.csv"), "--text-columns", "q", "--label-column", "y", "--model", str(tiny_model),
                 "--output-dir", str(out), "--max-steps", "1", "--protocol", protocol]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["eval_rows"]) == \
        ({"validation", "test"} if protocol == "paper" else {"validation"})
    with open(tmp_path / "train.csv", "a") as f:  # the training file is not scored on: adding to it changes nothing
        f.write("w99 x,no\n")
    assert main(["eval", str(out)]) == 0
    with open(tmp_path / "dev.csv", "a") as f:
        f.write("w98 x,yes\n")
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"sora eval: error: {out}: the validation rows differ from the ones the run was scored on (the data "
        "changed since training); restore the data the run was trained on")


def test_split_seed_gives_every_seed_the_same_validation_and_test_halves(glue_dir):
    from soralib.train.run import load_splits

    def halves(**fields):
        config = build_config("sora", None, {"task": "rte", "data_dir": str(glue_dir), "protocol": "paper", **fields})
        splits = load_splits(config)[1]
        return splits["validation"], splits["test"]

    assert halves(seed=1, split_seed=0) == halves(seed=0, split_seed=0) == halves(seed=0)
    assert halves(seed=1) != halves(seed=0)  # without it, each seed draws its own halves
