"""Rank discovery as a product: soralib.rank_pattern and soralib.lora_config_from give plain PEFT LoRA the ranks
SoRA kept, one exact key per module, no adapter on modules that kept none."""

import copy
import json

import peft
import pytest
import torch
from torch import nn

import soralib
from conftest import make_model, scramble, sora_model


def _kept(model):
    return {n.removeprefix("base_model.model."): int((m.sora_gate["default"] != 0).sum())
            for n, m in model.named_modules() if isinstance(m, soralib.SoraLayer)}


def _lora_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def _trained(arch):
    model = sora_model(arch)
    scramble(model, zero_fraction=0.5)
    with torch.no_grad():  # one module kept nothing, one kept everything
        layers = [m for m in model.modules() if isinstance(m, soralib.SoraLayer)]
        layers[0].sora_gate["default"].zero_()
        layers[1].sora_gate["default"].fill_(0.5)
    return model


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("prune", [False, True], ids=["gated", "pruned"])
def test_lora_config_from_gives_each_module_its_kept_rank_and_no_adapter_where_none_was_kept(arch, prune):
    model = _trained(arch)
    kept = _kept(model)
    if prune:
        soralib.prune(model)
    config = soralib.lora_config_from(model)
    lora = peft.get_peft_model(make_model(arch, seed=5), config)
    layers = _lora_layers(lora)
    assert {name: layer.r["default"] for name, layer in layers.items()} == {n: k for n, k in kept.items() if k}
    assert 0 in kept.values()
    sora_scale = {n.removeprefix("base_model.model."): m.scaling["default"]
                  for n, m in model.named_modules() if isinstance(m, soralib.SoraLayer)}
    for name, layer in layers.items():  # the default alpha keeps SoRA's lora_alpha / r_max ratio
        assert layer.scaling["default"] == pytest.approx(sora_scale[name])
    assert config.task_type == model.peft_config["default"].task_type
    assert set(config.modules_to_save) >= set(model.peft_config["default"].modules_to_save)


def test_rank_pattern_keys_select_exactly_their_module_where_plain_paths_would_not():
    base = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Linear(6, 5)))  # "0" is also the tail of "1.0"
    model = peft.get_peft_model(copy.deepcopy(base), soralib.SoraConfig(r=4, target_modules=["0", "1.0"]))
    with torch.no_grad():
        for gate in soralib.gate_parameters(model):
            gate.fill_(1.0)
        soralib.gate_parameters(model)[0][1:] = 0  # "0" keeps 1 rank, "1.0" keeps 4
    pattern = soralib.rank_pattern(model)
    assert sorted(pattern.values()) == [1, 4]
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["0", "1.0"],
                                                                     rank_pattern=pattern))
    assert {n: m.r["default"] for n, m in _lora_layers(lora).items()} == {"0": 1, "1.0": 4}
    config = soralib.lora_config_from(model)
    lora = peft.get_peft_model(copy.deepcopy(base), config)
    assert {n: m.r["default"] for n, m in _lora_layers(lora).items()} == {"0": 1, "1.0": 4}


def test_rank_pattern_leaves_out_modules_that_kept_no_rank():
    model = _trained("mlp")
    assert soralib.rank_pattern(model) == {"^fc2": _kept(model)["fc2"]}


@pytest.mark.parametrize("use_rslora, lora_alpha, expected", [
    (False, None, lambda k, r_max: 8 * k / r_max),  # SoRA's ratio lora_alpha / r_max, kept
    (True, None, lambda k, r_max: 8),               # rsLoRA: alpha does not depend on the rank
    (False, 16, lambda k, r_max: 16),               # one alpha for every module
], ids=["ratio", "rslora", "given"])
def test_lora_config_from_chooses_alpha_as_documented(use_rslora, lora_alpha, expected):
    model = sora_model("mlp", r=4, use_rslora=use_rslora, rank_pattern={"fc2": 6})  # lora_alpha = 2r = 8
    scramble(model, zero_fraction=0.3)
    config = soralib.lora_config_from(model, lora_alpha=lora_alpha)
    kept = _kept(model)
    r_max = {"fc1": 4, "fc2": 6}
    assert config.alpha_pattern == {f"^{n}": pytest.approx(expected(kept[n], r_max[n])) for n in kept if kept[n]}
    assert config.use_rslora is use_rslora


def test_lora_config_from_passes_other_lora_fields_through():
    config = soralib.lora_config_from(_trained("mlp"), lora_dropout=0.1, init_lora_weights="gaussian")
    assert (config.lora_dropout, config.init_lora_weights) == (0.1, "gaussian")


def test_lora_config_from_and_export_name_each_module_to_save_once(tmp_path):
    # a SEQ_CLS model gets its head names appended by PEFT at every get_peft_model: ranks JSON grew duplicates
    model = sora_model("bert", task_type="SEQ_CLS")
    assert len(model.peft_config["default"].modules_to_save) > len(set(model.peft_config["default"].modules_to_save))
    scramble(model)
    names = soralib.lora_config_from(model).modules_to_save
    assert sorted(names) == sorted(set(model.peft_config["default"].modules_to_save)) and len(names) == len(set(names))
    exported = json.loads((soralib.export_lora(model, tmp_path / "lora") / "adapter_config.json").read_text())
    assert sorted(exported["modules_to_save"]) == sorted(names)


def test_lora_config_json_round_trips_through_lora_config():
    config = soralib.lora_config_from(_trained("bert"))
    data = json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}))
    again = peft.LoraConfig(**data)
    assert (again.rank_pattern, again.alpha_pattern, set(again.target_modules)) == (
        config.rank_pattern, config.alpha_pattern, set(config.target_modules))


@pytest.mark.parametrize("call, expected", [
    (lambda: soralib.lora_config_from(make_model("mlp")), "no SoRA adapter 'default'; adapters: none (not a PEFT model)"),
    (lambda: soralib.rank_pattern(make_model("mlp")), "the model has no SoRA layers for adapter 'default'"),
    (lambda: soralib.lora_config_from(sora_model("mlp"), lora_alpha=0),
     "lora_alpha must be a finite number > 0 or None (keep SoRA's ratio), got 0"),
    (lambda: soralib.lora_config_from(_all_zero()), "every gate is zero: no module kept a rank, so there is no LoRA "
                                                    "to train"),
], ids=["plain-model", "rank_pattern-plain-model", "lora_alpha-zero", "all-gates-zero"])
def test_lora_config_from_rejects_what_has_no_lora(call, expected):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert str(excinfo.value) == expected


def _all_zero():
    model = sora_model("mlp")
    with torch.no_grad():
        for gate in soralib.gate_parameters(model):
            gate.zero_()
    return model
