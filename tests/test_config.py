"""SoraConfig speaks LoraConfig: rank_pattern, alpha_pattern, use_rslora, layers_to_transform/layers_pattern,
with PEFT LoRA's own rules, through pruning, save/load, export and the sparsity report."""

import math

import peft
import pytest
import torch

import soralib
from conftest import make_input, make_model, output, scramble, sora_model

# Keys as PEFT matches them: suffix regexes, the first match in dict order winning ("key" of layer 1 gets 5,
# not 3), an anchored full path, and a regex across layers.
RANKS = {r"layer\.1\.attention\.self\.key": 5, "key": 3, "^bert.encoder.layer.0.intermediate.dense": 7,
         r"layer\.\d\.output\.dense": 2}
ALPHAS = {"value": 3.0, r"layer\.1\..*query": 12.0}


def _per_module(model, layer_cls, adapter="default"):
    return {name.removeprefix("base_model.model."): (getattr(m, "r_max", m.r)[adapter], m.scaling[adapter])
            for name, m in model.named_modules() if isinstance(m, layer_cls)}


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora-scale", "rslora"])
def test_rank_and_alpha_patterns_give_each_module_the_rank_and_scale_peft_lora_gives_it(use_rslora):
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    common = dict(r=4, lora_alpha=8, target_modules=targets, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                  use_rslora=use_rslora)
    sora = peft.get_peft_model(make_model("bert"), soralib.SoraConfig(**common))
    lora = peft.get_peft_model(make_model("bert"), peft.LoraConfig(**common))
    got, want = _per_module(sora, soralib.SoraLayer), _per_module(lora, peft.tuners.lora.LoraLayer)
    assert got.keys() == want.keys() and len(got) == 12
    for name in want:
        assert got[name][0] == want[name][0], name
        assert got[name][1] == pytest.approx(want[name][1]), name
    assert got["bert.encoder.layer.1.attention.self.key"][0] == 5  # first match wins
    assert got["bert.encoder.layer.0.intermediate.dense"][0] == 7
    scale = 12.0 / (math.sqrt(4) if use_rslora else 4)
    assert got["bert.encoder.layer.1.attention.self.query"][1] == pytest.approx(scale)


def _patterned(arch="bert", **kwargs):
    model = sora_model(arch, rank_pattern={"query": 6, "intermediate.dense": 2}, alpha_pattern={"value": 3.0},
                       use_rslora=True, **kwargs)
    scramble(model, zero_fraction=0.5)
    with torch.no_grad():  # the first query module keeps 5 ranks: more than r=4, within its r_max of 6
        gate = next(m for n, m in model.named_modules() if n.endswith("query")).sora_gate["default"]
        gate[:5], gate[5:] = 0.7, 0.0
    return model


def test_pruned_patterned_adapter_keeps_each_modules_scale_through_save_and_load(tmp_path):
    model = _patterned()
    inputs = make_input("bert")
    expected = output(model, inputs)
    before = _per_module(model, soralib.SoraLayer)
    model.save_pretrained(tmp_path / "gated")  # unpruned: the shapes come from rank_pattern alone
    soralib.verify_adapter(make_model("bert"), tmp_path / "gated")
    kept = soralib.prune(model)
    assert kept["bert.encoder.layer.0.attention.self.query"] == 5
    torch.testing.assert_close(output(model, inputs), expected, atol=1e-6, rtol=0)
    assert _per_module(model, soralib.SoraLayer) == before  # pruning changes shapes, not r_max or the scale
    model.save_pretrained(tmp_path / "pruned")
    loaded = soralib.load_adapter_safely(make_model("bert"), tmp_path / "pruned")
    assert _per_module(loaded, soralib.SoraLayer) == before
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-6, rtol=0)
    assert loaded.peft_config["default"].rank_pattern == {"query": 6, "intermediate.dense": 2}


@pytest.mark.parametrize("layout", ["exact", "uniform"])
def test_export_folds_each_modules_own_scale_into_a_plain_lora(tmp_path, layout):
    model = _patterned()
    inputs = make_input("bert")
    expected = output(model, inputs)
    soralib.export_lora(model, tmp_path / "lora", layout=layout)
    loaded = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path / "lora")
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-5, rtol=0)


def test_sparsity_report_counts_lora_at_r_max_with_each_modules_r_max():
    model = _patterned()
    report = soralib.sparsity_report(model)
    for module in report["modules"]:
        assert module["r_max"] == (6 if module["module"].endswith("query") else
                                   2 if module["module"].endswith("intermediate.dense") else 4), module
    assert report["lora_params_at_r_max"] == sum(m["r_max"] * (m["in_features"] + m["out_features"])
                                                 for m in report["modules"])
    assert report["r_max_total"] == sum(m["r_max"] for m in report["modules"])


def test_layers_pattern_with_layers_to_transform_adapts_only_those_layers():
    config = soralib.SoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer")
    model = peft.get_peft_model(make_model("bert"), config)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, soralib.SoraLayer))
    assert adapted == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]


def test_optimizer_on_an_adapter_loaded_for_inference_says_to_load_it_trainable(tmp_path):
    sora_model("mlp").save_pretrained(tmp_path)
    frozen = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path)  # is_trainable=False, PEFT's default
    with pytest.raises(ValueError) as excinfo:
        soralib.create_sora_optimizer(frozen, lr=1e-3)
    assert str(excinfo.value) == ("no trainable SoRA gates: the adapter was loaded for inference; load it with "
                                  "PeftModel.from_pretrained(model, path, is_trainable=True)")
    trainable = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path, is_trainable=True)
    assert soralib.create_sora_optimizer(trainable, lr=1e-3)
