"""Every `sora` command that reads a run directory, and every way into the library (a top-level name or a
submodule imported directly), works in a fresh interpreter. soralib loads its names on first use (PEP 562), so
code that leans on a submodule, or on PEFT's "SORA" registration, that some earlier import happened to load
passes in-process tests and crashes for the user: each case here runs alone in its own process."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

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


def sora_argv(*argv) -> list[str]:
    return [sys.executable, "-m", "soralib.cli", *map(str, argv)]


def python(code: str, *argv) -> subprocess.CompletedProcess:
    return run([sys.executable, "-c", code, *map(str, argv)])


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def sora_adapter(tmp_path_factory):
    """A saved SoRA adapter of a one-layer model, `nn.Sequential(nn.Linear(4, 4))`."""
    import peft

    import soralib

    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4)), soralib.SoraConfig(r=2, target_modules=["0"]))
    out = tmp_path_factory.mktemp("sora_adapter")
    model.save_pretrained(out)
    return out


# Each imports only the submodule it names, and peft after it (with peft first, `import soralib` loads everything).
SETUP = "import pathlib, sys\nfrom torch import nn\nBASE, ADAPTER = nn.Sequential(nn.Linear(4, 4)), sys.argv[1]\n"
ENTRIES = {
    "verify.load_adapter_safely": "from soralib.verify import load_adapter_safely\n"
                                  "print(type(load_adapter_safely(BASE, ADAPTER).base_model).__name__)",
    "verify.verify_adapter": "from soralib.verify import verify_adapter\n"
                             "print(verify_adapter(BASE, ADAPTER).peft_type.value)",
    "adapter_dir": "from soralib.adapter_dir import read_adapter_config\n"
                   "print(read_adapter_config(pathlib.Path(ADAPTER), None).peft_type.value)",
    "config+get_peft_model": "from soralib.config import SoraConfig\nimport peft\n"
                             "print(type(peft.get_peft_model(BASE, SoraConfig(r=2, target_modules=['0'])).base_model).__name__)",
    "model+PeftModel.from_pretrained": "from soralib.model import SoraModel\nimport peft\n"
                                       "print(type(peft.PeftModel.from_pretrained(BASE, ADAPTER).base_model).__name__)",
}
EXPECTED = {"verify.verify_adapter": "SORA", "adapter_dir": "SORA"}
# the README's "import soralib  # registers the SORA type with PEFT", with no soralib name used after it
IMPORTS = {"soralib-then-peft": "import soralib, peft", "soralib-then-from-peft": "import soralib\nfrom peft import PeftConfig",
           "peft-then-soralib": "import peft, soralib"}
LOAD = ("\nimport sys, peft\nfrom torch import nn\nconfig = peft.PeftConfig.from_pretrained(sys.argv[1])\n"
        "model = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4)), sys.argv[1])\n"
        "print(config.peft_type.value, type(model.base_model).__name__)")


@pytest.fixture(scope="module")
def fresh(run_dir, sora_adapter, tmp_path_factory):
    """Each fresh interpreter's result (a future), by case. Each spends seconds importing torch on one core, so
    they all start here, two at a time, and each test waits for its own: the same checks in half the time."""
    out = tmp_path_factory.mktemp("fresh-out")
    cases = {f"export-{layout}": sora_argv("export", run_dir, "--layout", layout, "--out", out / layout)
             for layout in ("exact", "uniform")}
    cases["ranks"] = sora_argv("ranks", run_dir, "--out", out / "lora_config.json")
    cases |= {command: sora_argv(command, run_dir) for command in ("report", "eval")}
    cases |= {entry: [sys.executable, "-c", SETUP + code, str(sora_adapter)] for entry, code in ENTRIES.items()}
    cases |= {order: [sys.executable, "-c", imports + LOAD, str(sora_adapter)] for order, imports in IMPORTS.items()}
    with ThreadPoolExecutor(2) as pool:  # threads only wait on their subprocess
        yield out, {case: pool.submit(run, argv) for case, argv in cases.items()}


@pytest.mark.parametrize("layout", ["exact", "uniform"])
def test_export_in_a_fresh_process_writes_the_lora_adapter(fresh, layout):
    out, results = fresh
    result = results[f"export-{layout}"].result()
    assert result.returncode == 0, result.stderr
    assert json.loads((out / layout / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_ranks_report_and_eval_in_a_fresh_process_succeed(fresh):
    out, results = fresh
    for command in ("ranks", "report", "eval"):
        result = results[command].result()
        assert result.returncode == 0, f"sora {command}: {result.stderr}"
    assert json.loads((out / "lora_config.json").read_text())["rank_pattern"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_submodule_imported_alone_hands_sora_to_peft_as_the_top_level_names_do(fresh, entry):
    result = fresh[1][entry].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [EXPECTED.get(entry, "SoraModel")], result.stderr


@pytest.mark.parametrize("imports", IMPORTS)
def test_a_saved_sora_adapter_loads_through_peft_alone_after_import_soralib_in_either_order(fresh, imports):
    result = fresh[1][imports].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SORA", "SoraModel"], result.stderr


def test_import_soralib_alone_loads_no_torch_peft_or_transformers():
    result = python("import sys, soralib\nprint([m for m in ('torch', 'peft', 'transformers') if m in sys.modules])")
    assert result.stdout.split() == ["[]"], result.stderr


def test_submodules_are_attributes_of_soralib_without_loading_torch():
    code = ("import sys, soralib\n"
            "print(soralib.errors.InputError.__name__, soralib.schedule.stage_thresholds.__name__, "
            "[m for m in ('torch', 'peft', 'transformers') if m in sys.modules])")
    result = python(code)
    assert result.stdout.split() == ["InputError", "stage_thresholds", "[]"], result.stderr


def test_soralib_prune_is_the_function_however_imported_and_its_module_names_import_by_name():
    code = ("import soralib.prune as sp\nfrom soralib.prune import sparsity_report\n"
            "print(sp.__name__, type(sp).__name__, sparsity_report.__module__)")
    result = python(code)
    assert result.stdout.split() == ["prune", "function", "soralib.prune"], result.stderr
