"""write_report turns a run directory into valid PNG plots and a markdown summary, section by section."""

import json

import pytest

from soralib.report import module_position, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ["attention.self.query", "attention.self.value", "intermediate.dense"]
# Kept rank of layer l, kind k: the per-kind means are 5.50, 2.50 and 7.00.
RANKS = {"attention.self.query": [4, 7], "attention.self.value": [3, 2], "intermediate.dense": [8, 6]}


def write_json(path, obj):
    path.write_text(json.dumps(obj))


def write_jsonl(path, rows, torn_tail=False):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 9' if torn_tail else ""))


def metrics(method="sora", **extra):
    return {"task": "mrpc", "method": method, "seed": 3, "eval": {"f1": 0.8812, "accuracy": 0.8333},
            "main_metric": "f1", "kept_params": 12345, "lora_params_at_r_max": 40000, "train_seconds": 123.4,
            "steps": 500, **extra}


def sparsity():
    modules = [{"module": f"bert.encoder.layer.{layer}.{kind}", "r_max": 8, "kept_rank": RANKS[kind][layer],
                "in_features": 32, "out_features": 32, "kept_params": RANKS[kind][layer] * 64}
               for layer in range(2) for kind in KINDS]
    modules.append({"module": "classifier", "r_max": 8, "kept_rank": 1, "in_features": 32, "out_features": 2,
                    "kept_params": 34})
    return {"modules": modules, "kept_rank": 31, "r_max_total": 56, "kept_params": 12345,
            "lora_params_at_r_max": 40000, "kept_fraction": 0.3086}


def history():
    rows = [{"step": s, "epoch": s / 50, "stage": 0 if s < 50 else 1, "loss": 0.7 - s / 1000, "lr": 8e-4,
             "threshold": 3e-4 if s < 50 else 1e-3, "kept_rank": 48 - s // 4} for s in range(10, 110, 10)]
    rows[3].pop("kept_rank")  # keys other than step may be missing on some lines
    return rows


def stages():
    return [{"stage": n, "threshold": t, "kept_params": p, "kept_rank": r, "kept_fraction": p / 40000,
             "main_metric": "f1", "generalization": {"f1": g, "accuracy": g - 0.05},
             "memorization": {"f1": m, "accuracy": m - 0.02}, "checkpoint": f"stages/stage-{n}"}
            for n, t, p, r, g, m in [(1, 1e-3, 30000, 200, 0.8511, 0.9512), (2, 2e-3, 9000, 60, 0.8422, 0.9133),
                                     (3, 4e-3, 2000, 14, 0.7911, 0.8244)]]


def assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert 200 <= width <= 5000 and 200 <= height <= 5000, (width, height)


@pytest.fixture
def sora_run(tmp_path):
    run = tmp_path / "sora-run"
    run.mkdir()
    write_json(run / "metrics.json", metrics(test={"f1": 0.8701, "accuracy": 0.8202}))
    write_json(run / "sparsity.json", sparsity())
    write_jsonl(run / "history.jsonl", history(), torn_tail=True)
    return run


def test_module_position_splits_at_the_last_layer_index():
    assert module_position("bert.encoder.layer.11.attention.self.query") == (11, "attention.self.query")
    assert module_position("bert.encoder.layer.0.intermediate.dense") == (0, "intermediate.dense")
    assert module_position("bert.encoder.layer.3.output.dense") == (3, "output.dense")
    assert module_position("model.layers.27.self_attn.q_proj") == (27, "self_attn.q_proj")
    assert module_position("model.layers.5.mlp.down_proj") == (5, "mlp.down_proj")
    assert module_position("transformer.h.1.2.c_attn") == (2, "c_attn")  # the last index wins
    assert module_position("0.fc") == (0, "fc")
    assert module_position("classifier") == (None, "classifier")
    assert module_position("layer11.dense") == (None, "layer11.dense")  # digits inside a name are no index
    assert module_position("encoder.layer.12") == (None, "encoder.layer.12")  # a trailing index names no kind


def test_sora_run_gets_heatmap_steps_plot_and_full_markdown(sora_run):
    path = write_report(sora_run)
    assert path == sora_run / "report" / "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == ["kept_rank_heatmap.png", "kept_rank_over_steps.png",
                                                             "report.md"]
    assert_png(path.parent / "kept_rank_heatmap.png")
    assert_png(path.parent / "kept_rank_over_steps.png")
    text = path.read_text()
    assert text.startswith("# Run report: mrpc / sora / seed 3\n")
    for value in ["0.8812", "0.8333", "0.8701", "0.8202", "12,345", "40,000", "30.86%", "123.4 s", "500"]:
        assert value in text
    for kind, mean in [("attention.self.query", "5.50"), ("attention.self.value", "2.50"),
                       ("intermediate.dense", "7.00"), ("classifier", "1.00")]:
        assert f"| `{kind}` | " in text and f"| {mean} |" in text.split(f"`{kind}`")[1].splitlines()[0]
    assert "](kept_rank_heatmap.png)" in text and "](kept_rank_over_steps.png)" in text
    assert "## Stages" not in text and "stages.png" not in text


def test_scheduled_run_gets_stages_plot_and_table(tmp_path):
    run = tmp_path / "scheduled"
    run.mkdir()
    write_jsonl(run / "stages.jsonl", stages())  # no metrics.json: stages alone make a run directory
    path = write_report(run)
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md", "stages.png"]
    assert_png(path.parent / "stages.png")
    text = path.read_text()
    assert "## Stages" in text and "](stages.png)" in text
    assert "| 2 | 0.002 | 9,000 | 22.50% | 0.8422 | 0.9133 |" in text
    assert "## Metrics" not in text and "kept_rank_heatmap" not in text


def test_an_interrupted_run_gets_its_curves_and_says_it_is_unfinished(tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.yaml").write_text("task: mrpc\nmethod: sora\nmodel: minilm\nseed: 3\n")  # as sora train writes it
    write_jsonl(run / "history.jsonl", history(), torn_tail=True)  # killed mid-line, before metrics.json
    path = write_report(run)
    assert sorted(p.name for p in path.parent.iterdir()) == ["kept_rank_over_steps.png", "report.md"]
    assert_png(path.parent / "kept_rank_over_steps.png")
    text = path.read_text()
    assert "Unfinished run: no metrics.json yet" in text and "## Metrics" not in text


def test_lora_run_with_only_metrics_gets_markdown_without_plots(tmp_path):
    run = tmp_path / "lora"
    run.mkdir()
    write_json(run / "metrics.json", metrics(method="lora"))
    path = write_report(run)
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]
    text = path.read_text()
    assert "mrpc / lora / seed 3" in text and "| **f1** (main) | 0.8812 |" in text
    assert "## Plots" not in text and "## Kept rank per module kind" not in text and ".png" not in text


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_non_run_directory_is_a_one_line_value_error(tmp_path, make):
    run = tmp_path / "nothing"
    if make == "empty":
        run.mkdir()
        (run / "history.jsonl").write_text('{"step": 1}\n')  # a history alone is not a run
    with pytest.raises(ValueError, match="not a soralib run directory") as info:
        write_report(run)
    assert str(run) in str(info.value) and "\n" not in str(info.value)
    assert not (run / "report").exists()


def test_rerun_overwrites_the_report_and_leaves_no_temporaries(sora_run):
    write_report(sora_run)
    write_json(sora_run / "metrics.json", metrics(eval={"f1": 0.9123}))
    text = write_report(sora_run).read_text()
    assert "0.9123" in text and "0.8812" not in text
    assert not [p for p in (sora_run / "report").iterdir() if p.name.startswith(".")]
