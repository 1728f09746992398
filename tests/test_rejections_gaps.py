"""The `test_gap_*` tests: gaps found while docs/errors.md was written, closed since (each now backs a row of that
page), and rejections added beside them: `sora train`, `eval`, `export` and `report`, and library arguments."""

import shutil

import pytest
import torch

import soralib
from conftest import make_model, sora_model, train_args
from rejection_helpers import _fake_run, _write, fails_cleanly
from soralib.cli import main
from soralib.errors import InputError
from soralib.report import write_report

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


@pytest.mark.parametrize("flags, expected", [
    (["--threshold", "inf"], "threshold must be a finite number >= 0, got inf"),
    (["--target-modules", "qeury"], "target_modules entry 'qeury' matches no module of the model; closest linear modules: key, query"),
    (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--method", "adalora", "--r", "1"], "adalora needs r >= 2 (it prunes from r down to a smaller target), got 1"),
], ids=["threshold-inf", "target-modules-typo", "lora-dropout-above-1", "adalora-r-1"])
def test_gap_rejected_only_after_config_yaml_is_written(glue_dir, tiny_model, tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, *flags), expected, out)


def test_gap_overwrite_with_a_flag_rejected_late_keeps_the_old_run(glue_dir, tiny_model, tmp_path, capsys):
    out = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    try:
        assert main(train_args(glue_dir, tiny_model, out, "--overwrite", "--target-modules", "qeury")) == 2
    finally:
        capsys.readouterr()
    assert (out / "metrics.json").read_text() == '{"task": "rte"}'


def test_gap_a_deepspeed_config_that_is_not_a_json_object(glue_dir, tiny_model, tmp_path, capsys):
    ds = _write(tmp_path / "ds.json", "5")
    out = tmp_path / "run"
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, out, "--deepspeed", ds), str(ds), out)


def test_gap_an_output_dir_under_a_file(glue_dir, tiny_model, tmp_path, capsys):
    parent = _write(tmp_path / "afile", "mine")
    fails_cleanly(capsys, train_args(glue_dir, tiny_model, parent / "run"), str(parent))


def test_gap_export_out_over_a_directory_that_is_not_an_adapter(glue_dir, tiny_model, tmp_path, capsys):
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model)
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model, _, _ = load_base(config, 2)
    wrap(config, model, total_steps=1).save_pretrained(str(run / "sora_adapter"))
    mine = tmp_path / "mine"
    mine.mkdir()
    _write(mine / "notes.txt", "keep me")
    try:
        assert main(["export", str(run), "--out", str(mine)]) == 2
    finally:
        capsys.readouterr()
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_out_over_an_adapter_holding_other_files_is_refused_then_an_earlier_export_is_replaced(
        glue_dir, tiny_model, tmp_path, capsys):
    from soralib.train.config import build_config
    from soralib.train.methods import load_base, wrap

    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    config = build_config("sora", None, {"task": "rte", "model": str(tiny_model), "output_dir": str(run)})
    model, _, _ = load_base(config, 2)
    wrap(config, model, total_steps=1).save_pretrained(str(run / "sora_adapter"))
    fails_cleanly(capsys, ["export", run, "--out", _write(tmp_path / "afile", "mine")],
                  f"--out {tmp_path / 'afile'} is a file; choose a directory")
    out = tmp_path / "served"
    assert main(["export", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    _write(out / "NOTES.txt", "keep me")
    (out / "old").mkdir()
    _write(out / "old" / "adapter_config.json", "{}")
    fails_cleanly(capsys, ["export", run, "--out", out],
                  f"--out {out} holds NOTES.txt, old/, which an export does not write; move them out or choose "
                  "another --out")
    assert (out / "NOTES.txt").read_text() == "keep me" and (out / "old" / "adapter_config.json").read_text() == "{}"
    (out / "NOTES.txt").unlink()
    shutil.rmtree(out / "old")
    assert main(["export", str(run), "--out", str(out), "--layout", "exact"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_gap_eval_of_a_full_run_without_its_trained_parameters(glue_dir, tiny_model, tmp_path, capsys):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, method="full")
    fails_cleanly(capsys, ["eval", run], "model/trainable.safetensors")


def test_gap_report_of_a_sparsity_json_with_the_wrong_types(tmp_path):
    (tmp_path / "metrics.json").write_text('{"task": "rte"}')
    (tmp_path / "sparsity.json").write_text('{"modules": 5}')
    with pytest.raises(InputError, match="sparsity.json"):
        write_report(tmp_path)


@pytest.mark.parametrize("call", [
    lambda tmp: soralib.SoraConfig(lora_alpha="16"),  # TypeError: '>' not supported between 'str' and 'int'
    lambda tmp: soralib.SoraConfig(lora_alpha=float("inf")),  # accepted: scaling = inf
    lambda tmp: soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_lr=-1.0),  # accepted
    lambda tmp: soralib.create_sora_optimizer(sora_model("mlp"), lr=float("inf")),  # accepted
    lambda tmp: soralib.get_threshold(torch.optim.SGD(make_model("mlp").parameters(), lr=0.1)),  # StopIteration
    lambda tmp: soralib.export_lora(sora_model("mlp"), tmp / "out", adapter="other"),  # KeyError: 'other'
    lambda tmp: soralib.export_lora(make_model("mlp"), tmp / "out"),  # AttributeError: no peft_config
], ids=["lora_alpha-str", "lora_alpha-inf", "gate_lr-negative", "lr-inf", "get_threshold-plain-optimizer",
        "export-unknown-adapter", "export-plain-model"])
def test_gap_library_arguments(tmp_path, call):
    with pytest.raises(ValueError):
        call(tmp_path)


@pytest.mark.parametrize("name", ["RTE/train.tsv", "custom.csv"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name):
    from soralib.train.data import load_custom, load_glue_dir

    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n" if name.endswith("tsv")
                     else b"t,y\ncaf\xe9,1\n")
    with pytest.raises(InputError, match=r"line 2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        if name.endswith("tsv"):
            load_glue_dir("rte", tmp_path)
        else:
            load_custom(path, path, ["t"], "y")


def test_a_missing_model_flag_says_what_is_required(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    del args[args.index("--model"):args.index("--model") + 2]
    fails_cleanly(capsys, args, "--model is required: a local directory, a hub id, or 'minilm'", out)


def test_a_stages_line_with_a_non_object_generalization_is_refused_before_any_plot(tmp_path):
    (tmp_path / "stages.jsonl").write_text('{"stage": 1, "generalization": 5}\n')
    with pytest.raises(InputError, match="stages.jsonl: stage 1 has a non-object 'generalization'"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("where", ["run", "run/adapter"])
def test_export_out_inside_the_run_is_refused_and_the_run_kept(glue_dir, tiny_model, tmp_path, capsys, where):
    run = _fake_run(tmp_path / "run", glue_dir, tiny_model, **{"metrics.json": '{"task": "rte"}'})
    (run / "sora_adapter").mkdir()
    (run / "sora_adapter" / "adapter_config.json").write_text("{}")
    fails_cleanly(capsys, ["export", run, "--out", tmp_path / where], "would overwrite part of the run")
    assert (run / "metrics.json").read_text() == '{"task": "rte"}'
