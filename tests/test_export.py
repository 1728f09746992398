"""export_lora writes a standard PEFT LoRA that plain PEFT loads, in a process that never imports soralib."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import soralib
from conftest import ARCHS, make_input, output, scramble, sora_model

# Runs in a fresh interpreter: rebuilds each base model from its saved config and weights, loads the exported
# adapter with plain peft, and compares with the outputs the SoRA model gave. soralib must stay unimported.
LOADER = textwrap.dedent("""
    import json, sys, torch, peft, transformers
    sys.path.insert(0, sys.argv[2])
    from conftest import make_model
    cases = json.load(open(sys.argv[1]))
    worst = {}
    for case in cases:
        base = make_model(case["arch"], seed=0)
        model = peft.PeftModel.from_pretrained(base, case["adapter"]).eval()
        inputs = torch.load(case["inputs"], weights_only=True)
        with torch.no_grad():
            out = model(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.logits
        worst[case["adapter"]] = (out - torch.load(case["expected"], weights_only=True)).abs().max().item()
    assert "soralib" not in sys.modules, "the loader imported soralib"
    print(json.dumps(worst))
""")


def test_exported_lora_reproduces_sora_outputs_in_plain_peft_without_soralib(tmp_path):
    cases = []
    for arch in ARCHS:
        for layout in ("exact", "uniform"):
            model = sora_model(arch)
            scramble(model, zero_fraction=0.5)
            with torch.no_grad():  # one module pruned to rank 0: "exact" leaves it out, "uniform" pads it
                next(m for m in model.modules() if isinstance(m, soralib.SoraLayer)).sora_gate["default"].zero_()
            inputs = make_input(arch)
            case = {"arch": arch, "adapter": str(tmp_path / f"{arch}-{layout}"),
                    "inputs": str(tmp_path / f"{arch}-in.pt"), "expected": str(tmp_path / f"{arch}-{layout}.pt")}
            torch.save(inputs, case["inputs"])
            torch.save(output(model, inputs), case["expected"])
            soralib.export_lora(model, case["adapter"], layout=layout)
            cases.append(case)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "load.py").write_text(LOADER)
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    run = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "cases.json"), tests_dir],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    worst = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(worst) == 2 * len(ARCHS)
    assert max(worst.values()) <= 1e-5, worst


def test_exact_layout_has_per_module_ranks_with_alpha_equal_to_rank(tmp_path):
    model = sora_model("bert")
    scramble(model, zero_fraction=0.5)
    report = soralib.sparsity_report(model)
    soralib.export_lora(model, tmp_path / "a", layout="exact")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert config["rank_pattern"] == config["alpha_pattern"]
    for module in report["modules"]:
        key = f"base_model.model.{module['module']}.lora_A.weight"
        if module["kept_rank"] == 0:
            assert key not in tensors
        else:
            assert tensors[key].shape == (module["kept_rank"], module["in_features"])
    lora_params = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    assert lora_params == report["kept_params"]
    assert "base_model.model.classifier.weight" in tensors and config["modules_to_save"] == ["classifier"]


def test_uniform_layout_pads_every_module_to_the_largest_kept_rank(tmp_path):
    model = sora_model("llama")
    scramble(model, zero_fraction=0.6)
    report = soralib.sparsity_report(model)
    top = max(m["kept_rank"] for m in report["modules"])
    soralib.export_lora(model, tmp_path / "u", layout="uniform")
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "u" / "adapter_model.safetensors"))
    assert config["r"] == config["lora_alpha"] == top and not config["rank_pattern"]
    a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
    assert len(a_keys) == len(report["modules"])
    assert all(tensors[k].shape[0] == top for k in a_keys)


def test_export_replaces_an_earlier_export_whole(tmp_path):
    model = sora_model("mlp")
    scramble(model)
    out = tmp_path / "adapter"
    soralib.export_lora(model, out, layout="exact")
    soralib.export_lora(model, out, layout="uniform")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not json.loads((out / "adapter_config.json").read_text())["rank_pattern"]  # the second one
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("mine", ["stale.bin", "sub/notes.txt", "README.md", "adapter_model.safetensors/x"])
def test_export_into_a_directory_holding_other_files_is_refused_and_keeps_them(tmp_path, mine):
    out = tmp_path / "adapter"
    (out / mine).parent.mkdir(parents=True)
    (out / mine).write_text("mine")
    (out / "adapter_config.json").write_text("{}")
    shown = mine.split("/")[0] + ("/" if "/" in mine else "")
    with pytest.raises(ValueError, match=re.escape(f"{out} holds {shown}, which an export does not write; move")):
        soralib.export_lora(sora_model("mlp"), out)
    assert (out / mine).read_text() == "mine" and (out / "adapter_config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left beside it


def test_export_through_a_symlink_replaces_the_directory_it_points_to_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    soralib.export_lora(sora_model("mlp"), tmp_path / "link", layout="uniform")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    (tmp_path / "real" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt"):
        soralib.export_lora(sora_model("mlp"), tmp_path / "link", layout="uniform")
    assert (tmp_path / "real" / "notes.txt").read_text() == "mine"


def test_export_rejects_an_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout must be one of exact, uniform, got 'ragged'"):
        soralib.export_lora(sora_model("mlp"), tmp_path, layout="ragged")


def test_exact_export_of_nested_paths_that_end_alike_loads_with_the_right_ranks(tmp_path):
    import copy

    import peft
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 5)))  # paths "0" and "1.0"
    model = peft.get_peft_model(copy.deepcopy(base), soralib.SoraConfig(r=4, target_modules=["0", "1.0"]))
    scramble(model, zero_fraction=0.0)
    with torch.no_grad():
        gates = soralib.gate_parameters(model)
        gates[0][1:] = 0  # "0" keeps 1 rank, "1.0" keeps 4
    x = torch.randn(3, 4)
    expected = output(model, {"input": x})
    soralib.export_lora(model, tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(output(loaded, {"input": x}), expected, atol=1e-5, rtol=0)


def test_exporting_the_same_adapter_twice_gives_the_same_bytes(tmp_path):
    # safetensors orders the metadata keys at random on each save: one of 16 repeats would differ
    model = sora_model("mlp")
    scramble(model)
    files = set()
    for i in range(16):
        files.add((soralib.export_lora(model, tmp_path / str(i)) / "adapter_model.safetensors").read_bytes())
    assert len(files) == 1


def test_an_adapter_holding_nan_is_refused_and_nothing_is_written(tmp_path):
    # a diverged fp16 run exported NaN weights that plain peft loaded, and soralib's own verify_adapter refused
    model = sora_model("mlp")
    scramble(model)
    layer = next(m for m in model.modules() if isinstance(m, soralib.SoraLayer) and m.sora_gate["default"].any())
    with torch.no_grad():
        layer.sora_B["default"].weight[0, :] = float("nan")  # in every rank, the kept ones among them
    with pytest.raises(ValueError, match=r"the adapter holds NaN or Inf in base_model\.model\..*lora_B\.weight; "
                                         r"nothing exported \(the training diverged\)"):
        soralib.export_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_an_adapter_on_lm_head_exports_only_its_lora_weights_and_verifies(tmp_path):
    # PEFT's state dict adds the whole lm_head (vocab x hidden) when it is a target; the export carried it
    import peft
    import transformers as tf

    def base():
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model = peft.get_peft_model(base(), soralib.SoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                                           task_type="CAUSAL_LM"))
    scramble(model)
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 3]])}
    expected = output(model, inputs)
    soralib.export_lora(model, tmp_path / "lora")
    keys = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert keys and all(re.search(r"\.lora_[AB]\.weight$", k) for k in keys), sorted(keys)
    soralib.verify_adapter(base(), tmp_path / "lora")
    loaded = soralib.load_adapter_safely(base(), tmp_path / "lora")
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-5, rtol=0)
