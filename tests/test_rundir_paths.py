"""A run directory works from any current directory: config.yaml holds the local paths `sora train` was given
(model, data, --lora-config, --deepspeed) absolute, and a hub id or an alias such as minilm as given."""

import json
import random

import pytest
import yaml

from conftest import _sentence
from soralib.cli import main
from soralib.train.config import build_config, save_yaml

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")

RELATIVE = {"task": "rte", "model": "tiny-bert", "data_dir": "glue", "output_dir": "runs/rel", "epochs": "2",
            "batch_size": "8", "logging_steps": "2"}


def flags(fields: dict) -> list[str]:
    return [a for name, value in fields.items() for a in (f"--{name.replace('_', '-')}", value)]


@pytest.fixture
def project(glue_dir, tiny_model, tmp_path, monkeypatch):
    """The current directory: a project folder holding `glue` and `tiny-bert` (links to the fixtures)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "glue").symlink_to(glue_dir)
    (root / "tiny-bert").symlink_to(tiny_model)
    monkeypatch.chdir(root)
    return root.resolve()  # as os.getcwd() names it


@pytest.fixture
def elsewhere(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    return tmp_path / "elsewhere"


def test_a_run_trained_with_relative_paths_is_reused_from_another_directory(project, elsewhere, monkeypatch, capsys):
    assert main(["train", *flags(RELATIVE), "--max-steps", "4", "--threshold", "0.05"]) == 0
    run = project / "runs" / "rel"
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["validation"]["accuracy"] == json.loads((run / "metrics.json").read_text())["eval"]["accuracy"]
    for argv in (["export", run, "--out", elsewhere / "lora"], ["ranks", run], ["report", run]):
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["model"], saved["data_dir"]) == (str(project / "tiny-bert"), str(project / "glue"))
    # the adapter names a base model that loads from anywhere too (AutoPeftModel)
    assert json.loads((elsewhere / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(project / "tiny-bert")


def test_a_custom_run_trained_with_relative_files_is_evaluated_from_another_directory(tiny_model, tmp_path,
                                                                                      monkeypatch, elsewhere):
    project = tmp_path / "project"
    rng = random.Random(0)
    for name, n in (("a.csv", 24), ("b.csv", 8)):
        (project / name).parent.mkdir(exist_ok=True)
        (project / name).write_text("q,y\n" + "".join(f"{_sentence(rng)},{rng.choice('xy')}\n" for _ in range(n)))
    monkeypatch.chdir(project)
    assert main(["train", "--task", "custom", "--model", str(tiny_model), "--train-file", "a.csv", "--validation-file",
                 "b.csv", "--text-columns", "q", "--label-column", "y", "--output-dir", "run", "--max-steps", "2"]) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(project / "run")]) == 0


def _started(project, **fields):
    """A run directory as a run killed before its first checkpoint leaves it: only config.yaml."""
    out = project / "runs" / "rel"
    out.mkdir(parents=True)
    save_yaml(build_config("sora", None, {**RELATIVE, "max_steps": "1", **fields}), out / "config.yaml")
    return out


def test_a_run_started_with_relative_paths_resumes_from_another_directory(project, elsewhere, monkeypatch):
    out = _started(project)
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0 and (out / "metrics.json").is_file()


def test_resume_with_the_runs_own_relative_flags_from_its_directory_is_not_refused(project):
    _started(project)
    assert main(["train", *flags(RELATIVE), "--max-steps", "1", "--resume"]) == 0


def test_a_run_saved_with_relative_paths_by_an_older_soralib_still_resumes_with_its_own_flags(project):
    out = _started(project)
    old = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**old, "model": "tiny-bert", "data_dir": "glue"}, sort_keys=False))
    assert main(["train", *flags(RELATIVE), "--max-steps", "1", "--resume"]) == 0


def test_resume_with_a_relative_path_naming_another_folder_here_is_refused(project, elsewhere, monkeypatch, capsys):
    out = _started(project)
    (elsewhere / "glue").mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--task", "rte", "--output-dir", str(out), "--data-dir", "glue", "--resume"]) == 2
    assert (f"cannot resume {out} with other settings (data_dir: saved '{project / 'glue'}', "
            f"given '{elsewhere / 'glue'}')") in capsys.readouterr().err


def test_resume_naming_the_runs_data_dir_without_its_task_resumes(project):
    out = _started(project)
    assert main(["train", "--output-dir", str(out), "--data-dir", "glue", "--resume"]) == 0
    assert (out / "metrics.json").is_file()


def test_resume_naming_another_data_dir_without_the_task_is_refused_as_another_setting(project, elsewhere, capsys):
    out = _started(project)
    assert main(["train", "--output-dir", str(out), "--data-dir", str(elsewhere), "--resume"]) == 2
    assert (f"cannot resume {out} with other settings (data_dir: saved '{project / 'glue'}', given '{elsewhere}')"
            in capsys.readouterr().err)


@pytest.mark.parametrize("model, saved", [
    ("minilm", "minilm"),  # an alias loads the offline package even where a folder of that name exists
    ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    ("org/not-here", "org/not-here"),
    ("tiny-bert", "{project}/tiny-bert"),  # a folder here is what loads: as resolve_model_path finds it
    ("./tiny-bert", "{project}/tiny-bert"),
    ("../project/tiny-bert", "{project}/tiny-bert"),
    ("~/tiny-bert", "{project}/tiny-bert"),
    ("./not-here", "{project}/not-here"),  # written as a path: refused as one when loaded
])
def test_config_yaml_keeps_a_hub_id_or_alias_as_given_and_makes_a_local_model_absolute(project, monkeypatch, model,
                                                                                      saved):
    (project / "minilm").mkdir()
    monkeypatch.setenv("HOME", str(project))
    save_yaml(build_config("sora", None, {**RELATIVE, "model": model}), project / "config.yaml")
    assert yaml.safe_load((project / "config.yaml").read_text())["model"] == saved.format(project=project)


def test_every_local_path_field_is_saved_absolute_and_the_output_dir_as_given(project, monkeypatch):
    (project / "ranks.json").write_text("{}")
    (project / "ds.json").write_text("{}")
    monkeypatch.setenv("HOME", str(project))
    config = build_config("lora", None, {**RELATIVE, "lora_config": "ranks.json", "deepspeed": "~/ds.json"})
    save_yaml(config, project / "config.yaml")
    saved = yaml.safe_load((project / "config.yaml").read_text())
    assert {k: saved[k] for k in ("data_dir", "lora_config", "deepspeed", "output_dir")} == {
        "data_dir": str(project / "glue"), "lora_config": str(project / "ranks.json"),
        "deepspeed": str(project / "ds.json"), "output_dir": "runs/rel"}
