"""The rows of docs/errors.md for `sora report`, `eval`, `export` and `ranks` of a run directory: what is not a
readable or finished run is refused before anything is loaded or written, and eval never scores a broken result."""

import os

import pytest
import torch

from rejection_helpers import _fake_run, fails_cleanly
from soralib.layer import SoraLinear

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


# ---- report / eval / export of a run directory ----------------------------------------------------------------------

@pytest.mark.parametrize("make, expected", [
    ("file", "not a soralib run directory: {run} (not a directory)"),
    ("broken-metrics", "{run}/metrics.json: not readable JSON (Expecting property name enclosed in double quotes"),
    ("list-metrics", "{run}/metrics.json: expected a JSON object, got list"),
    ("broken-sparsity", "{run}/sparsity.json: not readable JSON (Expecting value: line 1 column 1"),
], ids=["file", "metrics-not-json", "metrics-not-an-object", "sparsity-not-json"])
def test_report_refuses_what_is_not_a_readable_run_and_writes_nothing(tmp_path, capsys, make, expected):
    run = tmp_path / "run"
    if make == "file":
        run.write_text("x")
    else:
        run.mkdir()
        (run / "metrics.json").write_text({"broken-metrics": "{", "list-metrics": "[1]"}.get(make, "{}"))
        if make == "broken-sparsity":
            (run / "sparsity.json").write_text("not json")
    fails_cleanly(capsys, ["report", run], expected.format(run=run))
    assert not (tmp_path / "run" / "report").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("sparsity.json", '{"modules": [{"module": "fc1", "r_max": "8", "kept_rank": 2}]}',
     "sparsity.json: modules[0] ('fc1'): field 'r_max' is '8' (str); expected a finite number"),
    ("sparsity.json", '{"modules": [{"module": 1, "kept_rank": 2}]}',
     "sparsity.json: modules[0] (1): field 'module' is 1 (int); expected a string"),
    ("stages.jsonl", '{"stage": 1, "kept_params": "9000", "generalization": {"f1": 0.8}}\n',
     "stages.jsonl: stage 1: field 'kept_params' is '9000' (str); expected a finite number"),
    ("stages.jsonl", '{"stage": 1, "main_metric": ["f1"], "kept_params": 9, "generalization": {"f1": 0.8}}\n',
     "stages.jsonl: stage 1: field 'main_metric' is ['f1'] (list); expected a string or null"),
], ids=["module-r_max-str", "module-name-int", "stage-kept_params-str", "stage-main_metric-list"])
def test_report_refuses_a_record_field_of_the_wrong_type_before_any_plot(tmp_path, capsys, name, text, expected):
    (tmp_path / "metrics.json").write_text('{"task": "rte"}')
    (tmp_path / name).write_text(text)
    fails_cleanly(capsys, ["report", tmp_path], f"{tmp_path}/{expected}")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("command", ["eval", "export", "ranks"])
def test_eval_and_export_refuse_a_directory_without_config_yaml(tmp_path, capsys, command):
    fails_cleanly(capsys, [command, tmp_path], f"not a soralib run directory: {tmp_path} (no config.yaml)")
    assert list(tmp_path.iterdir()) == []


def _listing(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


NOT_SORA = {"lora": ("lora", "adapter/adapter_config.json", "was trained with method lora, not sora: only a SoRA "
                                                               "run has gates"),
            "unfinished": ("sora", "adapter/adapter_config.json", "is not a finished SoRA run (no sora_adapter/)")}


@pytest.mark.parametrize("command", ["export", "ranks"])
@pytest.mark.parametrize("kind", NOT_SORA)
def test_export_and_ranks_refuse_a_run_that_is_not_a_finished_sora_run(glue_dir, tiny_model, tmp_path, capsys,
                                                                       command, kind):
    method, present, message = NOT_SORA[kind]
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method=method, **{present: "{}"})
    before = _listing(run)
    fails_cleanly(capsys, [command, run], f"{run} {message}")
    assert _listing(run) == before


def test_export_refuses_an_unknown_layout_before_loading_anything(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"sora_adapter/adapter_config.json": "{}"})
    before = _listing(run)
    fails_cleanly(capsys, ["export", run, "--layout", "ragged"], "layout must be one of exact, uniform, got 'ragged'")
    assert _listing(run) == before


@pytest.mark.parametrize("where", ["directory", "missing-parent"])
def test_ranks_refuses_an_out_path_that_is_not_a_file_before_loading_anything(glue_dir, tiny_model, tmp_path, capsys,
                                                                              where):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"sora_adapter/adapter_config.json": "{}"})
    out = tmp_path if where == "directory" else tmp_path / "nowhere" / "lora.json"
    what = "is a directory" if where == "directory" else "is in a directory that does not exist"
    fails_cleanly(capsys, ["ranks", run, "--out", out], f"--out {out} {what}; give a JSON file path such as "
                                                         f"{os.path.relpath(tmp_path / 'run-ranks.json')} (outside the run")


# ---- export and ranks write only what they wrote before -------------------------------------------------------------

def _finished_sora_run(run, glue_dir, tiny_model):
    """A SoRA run directory with config.yaml and a (fresh) sora_adapter/: enough for `sora export` and `sora ranks`."""
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    _fake_run(run, glue_dir, tiny_model)
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    wrap(config, load_base(config, 2)[0], total_steps=1).save_pretrained(str(run / "sora_adapter"))
    return run


def _contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["adapter", "adapter-new", "adapter/adapter_config.json", "config.yaml"])
def test_export_out_inside_another_run_is_refused_and_that_run_kept(glue_dir, tiny_model, tmp_path, capsys, where):
    run = _finished_sora_run(tmp_path / "run", glue_dir, tiny_model)
    other = _fake_run(tmp_path / "other", glue_dir, tiny_model, **{"adapter/adapter_config.json": "{}",
                                                                   "adapter/adapter_model.safetensors": "weights"})
    before = _contents(other)
    fails_cleanly(capsys, ["export", run, "--out", other / where],
                  f"--out {other / where} is inside another run, {other.resolve()}; choose a directory outside it")
    assert _contents(other) == before and not (other / "adapter-new").exists()


def test_export_replaces_its_own_earlier_export_and_no_adapter_it_did_not_write(glue_dir, tiny_model, tmp_path,
                                                                                 capsys):
    from safetensors.torch import save_file

    from soralib.cli import main

    run = _finished_sora_run(tmp_path / "run", glue_dir, tiny_model)
    assert main(["export", str(run), "--out", str(tmp_path / "served")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "served"), "--layout", "exact"]) == 0
    mine = tmp_path / "mine"  # an adapter of yours with just the two files an export writes
    mine.mkdir()
    (mine / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"base_model.model.fc.lora_A.weight": torch.ones(2, 4)}, str(mine / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    before = _contents(mine)
    fails_cleanly(capsys, ["export", run, "--out", mine],
                  f"--out {mine} holds an adapter that sora export did not write, which it never replaces; "
                  "choose another --out")
    assert _contents(mine) == before


@pytest.mark.parametrize("where", ["run/ranks.json", "other/config.yaml", "other/adapter/adapter_config.json",
                                   "mydata.jsonl"])
def test_ranks_out_is_a_new_file_outside_every_run(glue_dir, tiny_model, tmp_path, capsys, where):
    run = _finished_sora_run(tmp_path / "run", glue_dir, tiny_model)
    _fake_run(tmp_path / "other", glue_dir, tiny_model, **{"adapter/adapter_config.json": "{}"})
    (tmp_path / "mydata.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    before = _contents(tmp_path)
    out = tmp_path / where
    holder = out.parent if where.startswith("run/") else tmp_path / "other"
    expected = (f"--out {out} exists; sora ranks writes a new file and replaces none" if where == "mydata.jsonl" else
                f"--out {out} is inside the run {holder}; give a JSON file path such as "
                f"{os.path.relpath(tmp_path / 'run-ranks.json')} outside every run")
    fails_cleanly(capsys, ["ranks", run, "--out", out], expected)
    assert _contents(tmp_path) == before


def test_ranks_of_the_current_directory_suggests_an_out_path_beside_the_run(glue_dir, tiny_model, tmp_path, capsys,
                                                                             monkeypatch):
    # `cd runs/mrpc && sora ranks . --out ranks.json` suggested "-ranks.json", inside the run: refused in turn
    run = _finished_sora_run(tmp_path / "mrpc", glue_dir, tiny_model)
    monkeypatch.chdir(run)
    fails_cleanly(capsys, ["ranks", ".", "--out", "ranks.json"], f"--out ranks.json is inside the run {run}; give a JSON "
                  "file path such as ../mrpc-ranks.json outside every run")


def test_eval_with_a_missing_data_dir_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    fails_cleanly(capsys, ["eval", run, "--data-dir", tmp_path / "nowhere"],
                  f"GLUE data directory not found: {tmp_path / 'nowhere'}")


def test_eval_of_a_custom_run_refuses_data_dir_which_only_glue_runs_read(tiny_model, tmp_path, capsys):
    from soralib.train.config import build_config, save_yaml

    run = tmp_path / "run"
    run.mkdir()
    save_yaml(build_config("sora", None, {"task": "custom", "model": str(tiny_model), "text_columns": "q",
                                          "train_file": str(tmp_path / "a.csv"), "validation_file": str(tmp_path / "b.csv"),
                                          "output_dir": str(run)}), run / "config.yaml")
    fails_cleanly(capsys, ["eval", run, "--data-dir", "/nowhere"],
                  f"{run}: --data-dir is used only with a GLUE task, got task 'custom'; the run re-reads its own "
                  "train_file and validation_file")
    assert _listing(run) == ["config.yaml"]


def test_eval_of_a_sora_run_without_its_adapter_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    fails_cleanly(capsys, ["eval", run], f"{run} has no finished adapter (adapter/adapter_config.json)")
    assert _listing(run) == ["config.yaml"]


def test_eval_of_a_run_whose_adapter_fails_verification_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"adapter/adapter_config.json": "{}"})
    fails_cleanly(capsys, ["eval", run], f"{run / 'adapter' / 'adapter_model.safetensors'}: missing; expected an "
                                         "adapter directory with adapter_config.json and adapter_model.safetensors")


def test_eval_of_a_full_run_whose_parameters_do_not_fit_the_base_model_is_refused(glue_dir, tiny_model, tmp_path,
                                                                                 capsys):
    from safetensors.torch import save_file

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    save_file({"no.such.weight": torch.zeros(2)}, str(run / "model" / "trainable.safetensors"))
    fails_cleanly(capsys, ["eval", run], f"{run}/model does not fit the base model: unknown parameters "
                                         "['no.such.weight']")


# ---- eval never scores a broken result ---------------------------------------------------------------------------

def _sora_run(run, glue_dir, tiny_model, b_value, **config_edit):
    """A SoRA run directory whose adapter/ holds B = `b_value` everywhere and the config edited with `config_edit`."""
    import json

    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    _fake_run(run, glue_dir, tiny_model)
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model = wrap(config, load_base(config, 2)[0], total_steps=1)
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, SoraLinear)):
            layer.sora_B["default"].weight.fill_(b_value)
    model.save_pretrained(str(run / "adapter"))
    path = run / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_edit}))
    return run


def _full_run(run, glue_dir, tiny_model, name, value):
    """A full-fine-tuning run directory whose model/trainable.safetensors holds parameter `name` filled with `value`."""
    from safetensors.torch import load_file, save_file

    _fake_run(run, glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    shape = load_file(str(tiny_model / "model.safetensors"))[name].shape
    save_file({name: torch.full(shape, value)}, str(run / "model" / "trainable.safetensors"))
    return run


def test_eval_of_a_run_whose_adapter_has_an_absurd_scale_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    run = _sora_run(tmp_path / "run", glue_dir, tiny_model, 0.01, lora_alpha=1e308)
    fails_cleanly(capsys, ["eval", run], "lora_alpha / r, is 1e+308 / 8 = 1.25e+307; expected |scale| <= 10000")


def test_eval_of_a_full_run_with_non_finite_weights_is_refused_before_evaluating(glue_dir, tiny_model, tmp_path,
                                                                                  capsys, monkeypatch):
    run = _full_run(tmp_path / "run", glue_dir, tiny_model, "classifier.weight", float("nan"))
    monkeypatch.setattr("transformers.Trainer.evaluate", lambda *a, **k: pytest.fail("evaluated"))
    fails_cleanly(capsys, ["eval", run], f"{run / 'model' / 'trainable.safetensors'}: tensor 'classifier.weight' has "
                                         "NaN or Inf values; expected finite numbers")


def test_eval_of_a_full_run_whose_parameter_has_another_shape_is_refused(glue_dir, tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    (run / "model").mkdir()
    save_file({"classifier.bias": torch.zeros(5)}, str(run / "model" / "trainable.safetensors"))
    fails_cleanly(capsys, ["eval", run], f"{run}/model does not fit the base model: 'classifier.bias' has shape (5,), "
                                         "expected (2,)")


@pytest.mark.parametrize("method", ["sora", "full"])
def test_eval_refuses_non_finite_outputs_instead_of_reporting_a_score(glue_dir, tiny_model, tmp_path, capsys, method):
    # finite weights large enough to overflow float32 in the forward pass: a full run's pass every check and are
    # caught by their outputs; an adapter's factors are refused up front (verify_adapter's bound)
    if method == "sora":
        run = _sora_run(tmp_path / "run", glue_dir, tiny_model, 3e38)
        expected = "sora_B.weight' holds values up to 3e+38 in size; expected |value| <= 10000"
    else:
        run = _full_run(tmp_path / "run", glue_dir, tiny_model, "bert.embeddings.word_embeddings.weight", 3e38)
        expected = (f"{run}: the model's outputs on validation hold NaN or Inf; the saved result is broken, so no "
                    "score is reported")
    err = fails_cleanly(capsys, ["eval", run], expected)
    assert '"accuracy"' not in err


@pytest.mark.parametrize("command", ["export", "ranks"])
def test_export_or_ranks_of_a_custom_run_killed_before_its_metrics_says_it_did_not_finish(tiny_model, tmp_path,
                                                                                          capsys, command):
    # sora_adapter/ is written before the final evaluation, metrics.json after: it was a FileNotFoundError traceback
    from soralib.train.config import build_config, save_yaml

    run = tmp_path / "run"
    config = build_config("sora", None, {"task": "custom", "train_file": str(tmp_path / "a.csv"), "text_columns": "t",
                                         "validation_file": str(tmp_path / "a.csv"), "model": str(tiny_model),
                                         "output_dir": str(run)})
    (run / "sora_adapter").mkdir(parents=True)
    (run / "sora_adapter" / "adapter_config.json").write_text("{}")
    save_yaml(config, run / "config.yaml")
    fails_cleanly(capsys, [command, run], f"{run} did not finish (no metrics.json, which holds the custom task's "
                                          "number of labels); finish it with sora train --resume")


def test_resume_of_a_run_whose_saved_config_was_hand_edited_to_a_bad_value_is_refused_before_loading(
        glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("threshold_mode: fixed", "threshold_mode: bogus"))
    before = sorted(p.name for p in run.iterdir())
    err = fails_cleanly(capsys, ["train", "--output-dir", run, "--resume"],
                        "threshold_mode must be one of fixed, lr_scaled, got 'bogus'")
    assert "Loading weights" not in err and sorted(p.name for p in run.iterdir()) == before
