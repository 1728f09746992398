"""Every `sora` command that reads a run directory works in a fresh interpreter. soralib loads its names on
first use (PEP 562), so a command that leans on a submodule some earlier import happened to load passes
in-process tests and crashes for the user: each command here runs alone in its own process."""

import json
import os
import subprocess
import sys

import pytest

from conftest import train_args
from soralib.cli import main


@pytest.fixture(scope="module")
def run_dir(glue_dir, tiny_model, tmp_path_factory):
    """A finished SoRA run, trained in-process: only the commands under test run in fresh processes."""
    out = tmp_path_factory.mktemp("fresh") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORALIB_CACHE", str(tmp_path_factory.getbasetemp() / "fresh-cache"))
        assert main(train_args(glue_dir, tiny_model, out, "--max-steps", "4", "--threshold", "0.01")) == 0
    return out


def sora(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "soralib.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("layout", ["exact", "uniform"])
def test_export_in_a_fresh_process_writes_the_lora_adapter(run_dir, tmp_path, layout):
    result = sora("export", run_dir, "--layout", layout, "--out", tmp_path / "lora")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_ranks_report_and_eval_in_a_fresh_process_succeed(run_dir, tmp_path):
    ranks = sora("ranks", run_dir, "--out", tmp_path / "lora_config.json")
    assert ranks.returncode == 0, ranks.stderr
    assert json.loads((tmp_path / "lora_config.json").read_text())["rank_pattern"]
    for command in ("report", "eval"):
        result = sora(command, run_dir)
        assert result.returncode == 0, f"sora {command}: {result.stderr}"
