"""The learning-rate searches (bench/lr.py): each family's lr from a validation search, used by the matrix
(bench/matrix.py through bench.quality) and shown by the tables; the per-task search, and --lr-from-epochs which
trains a long block at a shorter search's lr. Fake cell runners: nothing is trained."""

import pytest

from bench import common, lr, quality, tables
from bench_helpers import _quality_record


def _lr_record(task, variant, seed, val, lr=None, kept=1000, search=True):
    """A finished cell at `lr` (None: the shipped lr), keyed exactly as the harness keys it; a search cell
    (`--set lr=` on its command) or, with search=False, a matrix cell at a chosen lr."""
    extra = (("lr", lr),) if lr else ()
    record = _quality_record(task, variant, seed, test=val, kept=kept, val=val)
    record.update(key=quality.Cell(task, variant, seed, 20.0, extra=extra).key, extra=dict(extra),
                  command="python -m bench.quality --seeds 0" + (f" --set lr={lr}" if lr and search else ""))
    if variant == "adalora":  # sized by the sora cell of its own lr, as in a search
        record["budget"] = {"source": quality.Cell(task, "sora", seed, 20.0, extra=extra).key}
    return record


def _lr_search():
    """lora: 2e-4 wins on the mean (0.72 against 0.70) though it loses on mrpc; sora: the shipped lr wins;
    adalora: 2e-4 wins on rte, the one task it was searched on."""
    return [_lr_record("rte", "lora", 0, 0.60), _lr_record("mrpc", "lora", 0, 0.80),
            _lr_record("rte", "lora", 0, 0.66, "2e-4"), _lr_record("mrpc", "lora", 0, 0.78, "2e-4"),
            _lr_record("rte", "sora", 0, 0.70), _lr_record("mrpc", "sora", 0, 0.85),
            _lr_record("rte", "sora", 0, 0.65, "2e-4", kept=700), _lr_record("mrpc", "sora", 0, 0.80, "2e-4"),
            _lr_record("rte", "adalora", 0, 0.45), _lr_record("rte", "adalora", 0, 0.50, "2e-4")]


def test_each_family_trains_at_the_lr_with_the_best_mean_validation_score():
    assert lr.chosen(_lr_search(), "minilm", 20.0, 1) == {"sora": None, "lora": "2e-4", "adalora": "2e-4"}
    running = _lr_search() + [_lr_record("rte", "lora", 0, 0.90, "2e-3")]  # best so far, but mrpc not yet run
    assert lr.chosen(running, "minilm", 20.0, 1)["lora"] is None  # an incomplete search chooses nothing yet
    # the matrix's own cells never reopen or sway the search: the chosen lr on a task not searched (where an
    # older shipped-lr cell exists), and AdaLoRA at its lr sized by sora at the shipped lr, scoring worse
    sized = _lr_record("rte", "adalora", 0, 0.10, "2e-4", search=False)
    sized.update(key=sized["key"] + "-bxyz", budget={"source": quality.Cell("rte", "sora", 0, 20.0).key})
    matrix = _lr_search() + [_lr_record("cola", "lora", 0, 0.5), sized,
                             _lr_record("cola", "lora", 0, 0.3, "2e-4", search=False)]
    assert lr.chosen(matrix, "minilm", 20.0, 1) == lr.chosen(_lr_search(), "minilm", 20.0, 1)
    tie = [_lr_record("rte", "lora", 0, 0.6), _lr_record("rte", "lora", 0, 0.6, "5e-4")]
    assert lr.chosen(tie, "minilm", 20.0, 1)["lora"] is None  # a tie keeps the shipped lr
    assert lr.chosen(_lr_search(), "minilm", 20.0, 2) == {"sora": None, "lora": None, "adalora": None}  # other jobs
    assert [lr.family(v) for v in ("sora-budget", "sora-schedule", "lora", "full")] == ["sora", "sora", "lora", None]
    assert (lr.shipped("lora"), lr.shipped("full")) == (8e-4, 2e-5)  # read from the shipped YAMLs


def test_the_matrix_runs_each_family_at_its_searched_lr_unless_one_lr_is_set(tmp_path, capsys):
    results = tmp_path / "quality.jsonl"
    for record in _lr_search():
        common.append_jsonl(results, record)
    argv = ["--lr-search", "family", "--dry-run", "--tasks", "rte", "--seeds", "0,1", "--methods", "sora,lora,adalora", "--results",
            str(results), "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "lr    lora: 2e-4" in out and "lr    sora: shipped" in out and "lr    adalora: 2e-4" in out
    runs = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith("run ")}
    assert "skip  " + quality.Cell("rte", "lora", 0, 20.0, extra=(("lr", "2e-4"),)).key in out  # the search cell
    lora1 = next(line for key, line in runs.items() if key.startswith("rte-lora-s1"))
    assert "--lr 2e-4" in lora1 and all("--lr" not in line for key, line in runs.items() if "sora" in key)
    # AdaLoRA's search cell was sized by sora at 2e-4 (700 parameters); the matrix sizes it by sora at sora's lr
    adalora0 = next(line for key, line in runs.items() if key.startswith("rte-adalora-s0"))
    assert "--lr 2e-4" in adalora0 and "--target-params 1000" in adalora0
    assert quality.main(argv + ["--set", "lr=5e-4"]) == 0  # one lr for all: how a search's cells are run
    out = capsys.readouterr().out
    assert out.count("run   ") == 6 and out.count("--lr 5e-4") == 4 and out.count("lr 5e-4") == 6


def test_tables_show_each_family_at_its_chosen_lr_and_the_search_apart(tmp_path):
    results = tmp_path / "results"
    full = [_lr_record("rte", "full", 0, 0.75), _lr_record("rte", "full", 1, 0.20, "5e-4")]  # full: not searched
    for record in _lr_search() + full:
        common.append_jsonl(results / "quality.jsonl", record)
    readme = tmp_path / "README.md"
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert ("Learning rates: sora 8e-4 (shipped), lora 2e-4 (validation search), adalora 2e-4 (validation search)"
            in text)
    assert "| rte (accuracy) | full | 1 | 75.00 |" in text  # its cell at another lr is left out, not averaged in
    assert "| rte (accuracy) | lora | 1 | 66.00 |" in text and "| rte (accuracy) | lora | 1 | 60.00 |" not in text
    assert "| rte (accuracy) | adalora |" not in text  # its 2e-4 cell was sized by a sora cell not in the table
    sized = _lr_record("rte", "adalora", 0, 0.55, "2e-4", search=False)  # the matrix's: sized by sora at 8e-4
    sized.update(key=sized["key"] + "-bxyz", budget={"source": quality.Cell("rte", "sora", 0, 20.0).key})
    common.append_jsonl(results / "quality.jsonl", sized)
    assert tables.main(["--results-dir", str(results), "--readme", str(readme)]) == 0
    assert "| rte (accuracy) | adalora | 1 | 55.00 |" in readme.read_text()
    search = "| lora | 2e-4 | 78.00 | 66.00 | 72.00 | chosen |\n| lora | 8e-4 (shipped) | 80.00 | 60.00 | 70.00 |  |"
    assert search in text


def test_per_task_search_runs_every_grid_lr_on_seed_0_then_the_other_seeds_at_the_winner(tmp_path, monkeypatch,
                                                                                          capsys):
    score = {"2e-4": 0.70, None: 0.60, "2e-3": 0.75}  # None: the shipped 8e-4; rte's winner is 2e-3
    ran = []

    def fake_run_cell(cell, args, records):
        extra = dict(cell.extra)
        ran.append((cell.task, cell.seed, extra.get("lr")))
        best = score[extra.get("lr")] - (0.2 if cell.task == "mrpc" and extra.get("lr") == "2e-3" else 0)
        return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "seed": cell.seed,
                "epochs": cell.epochs, "model": cell.model, "jobs": cell.jobs, "extra": extra,
                "metrics": {"main_metric": "accuracy", "eval": {"accuracy": best}, "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    results = tmp_path / "quality.jsonl"
    argv = ["--tasks", "rte,mrpc", "--seeds", "0,1,2", "--methods", "lora-equal", "--results", str(results),
            "--runs-dir", str(tmp_path / "runs")]
    assert quality.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("run   ") == 6 and "lr    lora-equal: searching" in out  # seeds 1, 2 wait for the search
    assert quality.main(argv) == 0  # one invocation: the search, then the seeds it planned
    assert sorted(ran, key=str) == sorted([(t, 0, lr_) for t in ("rte", "mrpc") for lr_ in ("2e-4", None, "2e-3")]
                                 + [("rte", 1, "2e-3"), ("rte", 2, "2e-3"), ("mrpc", 1, "2e-4"), ("mrpc", 2, "2e-4")],
                                 key=str)
    assert ran.index(("rte", 1, "2e-3")) < ran.index(("mrpc", 0, "2e-4"))  # a task's seeds before the next task
    records = common.read_jsonl(results)
    assert lr.per_task_choice(lr.per_task_points(records, "minilm", 20.0, 1, "rte", "lora-equal", "lora",
                                                 {"split_seed": "0"}), lr.GRID) == "2e-3"
    assert all(r["extra"]["split_seed"] == "0" for r in records)  # one dev split for every seed
    assert lr.per_task_choice({"2e-4": 0.5, "8e-4": 0.5}, lr.GRID) is None  # incomplete: nothing chosen
    assert lr.per_task_choice({"2e-4": 0.5, "8e-4": 0.5, "2e-3": 0.4}, lr.GRID) == "2e-4"  # a tie: the smaller
    assert quality.main(argv + ["--dry-run"]) == 0
    assert "lr    lora-equal: 2e-3, 2e-4" in capsys.readouterr().out


def test_a_long_block_trains_every_seed_at_the_lr_its_tasks_short_search_chose(tmp_path, monkeypatch, capsys):
    score = {"2e-4": 0.70, None: 0.60, "2e-3": 0.75}  # None: the shipped 8e-4; the 3-epoch winner is 2e-3
    ran = []

    def fake_run_cell(cell, args, records):
        extra = dict(cell.extra)
        ran.append((cell.task, cell.seed, cell.epochs, extra.get("lr")))
        return {"kind": "quality", "key": cell.key, "task": cell.task, "variant": cell.variant, "seed": cell.seed,
                "epochs": cell.epochs, "model": cell.model, "jobs": cell.jobs, "extra": extra,
                "lr_from_epochs": args.lr_from_epochs, "metrics": {"main_metric": "accuracy", "kept_params": 8,
                "eval": {"accuracy": score[extra.get("lr")]}, "test": {"accuracy": 0.5}}}

    monkeypatch.setattr(quality, "run_cell", fake_run_cell)
    base = ["--seeds", "0,1,2", "--methods", "lora-equal", "--results", str(tmp_path / "q.jsonl"),
            "--runs-dir", str(tmp_path / "runs")]
    long = base + ["--tasks", "rte,mrpc", "--epochs", "10", "--lr-from-epochs", "3", "--set", "eval_fraction=0.1"]
    assert quality.main(base + ["--tasks", "rte", "--epochs", "3", "--seeds", "0"]) == 0  # rte's search only
    ran.clear()
    assert quality.main(long) == 0
    assert ran == [("rte", s, 10.0, "2e-3") for s in (0, 1, 2)]  # no search at 10 epochs; mrpc has none at 3
    assert "wait  mrpc lora-equal: its search at 3 epochs is incomplete" in capsys.readouterr().out
    from bench import claims as claims_module

    claims = "\n".join(claims_module.claims_section(common.read_jsonl(tmp_path / "q.jsonl")))
    assert "| rte (accuracy) | lora-equal | 2e-3 (its 3-epoch search) | 3 |" in claims, claims
    with pytest.raises(SystemExit):
        quality.main(base + ["--epochs", "3", "--lr-from-epochs", "3"])
    assert "--lr-from-epochs 3: allowed only" in capsys.readouterr().err
