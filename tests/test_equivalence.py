"""SoRA computes what its equations say, on every supported architecture."""

import copy

import peft
import pytest
import torch

import soralib
from conftest import TARGETS, make_input, make_model, output, scramble, sora_model

ATOL = 1e-5


def test_all_ones_gates_without_threshold_equal_peft_lora_with_same_factors(arch):
    targets, head = TARGETS[arch]
    sora = sora_model(arch, gate_init="ones")
    scramble(sora, zero_fraction=0.0)
    lora = peft.get_peft_model(make_model(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   modules_to_save=head))
    sora_layers = {n: m for n, m in sora.named_modules() if isinstance(m, soralib.SoraLayer)}
    with torch.no_grad():
        for name, module in lora.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_A["default"].weight.copy_(sora_layers[name].sora_A["default"].weight)
                module.lora_B["default"].weight.copy_(sora_layers[name].sora_B["default"].weight)
    assert len(sora_layers) > 0
    inputs = make_input(arch)
    torch.testing.assert_close(output(sora, inputs), output(lora, inputs), atol=ATOL, rtol=0)


def test_forward_matches_the_gated_low_rank_equation():
    model = sora_model("mlp")
    scramble(model)
    layer = model.base_model.model.fc1
    x = torch.randn(5, 12)
    A, B, g = layer.sora_A["default"].weight, layer.sora_B["default"].weight, layer.sora_gate["default"]
    expected = layer.base_layer(x) + (8 / 4) * (B @ (g[:, None] * (A @ x.T))).T
    torch.testing.assert_close(layer(x), expected)


def test_pruned_model_has_smaller_factors_and_the_same_outputs(arch):
    model = sora_model(arch)
    scramble(model)
    inputs = make_input(arch)
    before = output(model, inputs)
    report = soralib.sparsity_report(model)
    kept = soralib.prune(model)
    torch.testing.assert_close(output(model, inputs), before, atol=ATOL, rtol=0)
    for layer in (m for m in model.modules() if isinstance(m, soralib.SoraLayer)):
        r = layer.r["default"]
        assert layer.sora_A["default"].weight.shape[0] == r == layer.sora_B["default"].weight.shape[1]
        assert layer.sora_gate["default"].shape == (r,) and bool((layer.sora_gate["default"] != 0).all())
    assert sum(kept.values()) == report["kept_rank"] < report["r_max_total"]


def test_merged_equals_unmerged_and_unmerge_restores_the_base(arch):
    model = sora_model(arch)
    scramble(model)
    inputs = make_input(arch)
    base_weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = output(model, inputs)
    model.base_model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), unmerged, atol=ATOL, rtol=0)
    model.base_model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], atol=1e-6, rtol=0)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(arch):
    model = sora_model(arch)
    scramble(model)
    inputs = make_input(arch)
    expected = output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, soralib.SoraLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, inputs), expected, atol=ATOL, rtol=0)


def test_disable_adapter_gives_the_base_model_outputs_head_included(arch):
    base = make_model(arch)
    inputs = make_input(arch)
    expected = output(base, inputs)
    model = sora_model(arch)
    scramble(model)
    # modules_to_save copies the head; train-like change it so that disabling must restore the original
    for m in model.modules():
        if isinstance(m, peft.utils.other.ModulesToSaveWrapper):
            with torch.no_grad():
                for p in m.modules_to_save["default"].parameters():
                    p.add_(0.5)
    assert not torch.allclose(output(model, inputs), expected, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), expected, atol=ATOL, rtol=0)


def test_unload_removes_sora_layers_and_restores_base_outputs(arch):
    inputs = make_input(arch)
    expected = output(make_model(arch), inputs)
    model = sora_model(arch)
    scramble(model)
    unloaded = model.unload()
    assert not any(isinstance(m, soralib.SoraLayer) for m in unloaded.modules())
    torch.testing.assert_close(output(unloaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pruned", [False, True], ids=["gated", "pruned"])
def test_save_then_load_on_a_differently_seeded_model_gives_identical_outputs(tmp_path, arch, pruned):
    model = sora_model(arch, seed=0)
    scramble(model)
    if pruned:
        soralib.prune(model)
    inputs = make_input(arch)
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    # The base weights must be the same (they are the pretrained model); the adapter init must not matter.
    torch.manual_seed(123)
    loaded = peft.PeftModel.from_pretrained(make_model(arch, seed=0), tmp_path)
    assert torch.equal(output(loaded, inputs), expected)


def test_two_adapters_switch_and_only_the_active_one_counts():
    model = sora_model("mlp")
    scramble(model, seed=3)
    inputs = make_input("mlp")
    first = output(model, inputs)
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    model.set_adapter("other")
    torch.testing.assert_close(output(model, inputs), output(make_model("mlp"), inputs))  # "other" has B = 0
    model.set_adapter("default")
    torch.testing.assert_close(output(model, inputs), first)


def test_prune_leaves_the_users_config_alone_so_reusing_it_builds_full_rank_adapters():
    config = soralib.SoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["mlp"][0])
    model = peft.get_peft_model(make_model("mlp"), config)
    scramble(model)
    kept = soralib.prune(model)
    assert model.peft_config["default"].kept_ranks == kept and sum(kept.values()) < 8
    assert config.kept_ranks == {}
    fresh = peft.get_peft_model(make_model("mlp", seed=1), config)  # the next seed of a loop
    assert [layer.r["default"] for _, layer in soralib.optim.sora_layers(fresh)] == [4, 4]


def test_two_adapters_sharing_one_config_both_load_with_peft_after_one_is_pruned(tmp_path):
    config = soralib.SoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["mlp"][0])
    model = peft.get_peft_model(make_model("mlp"), config, adapter_name="one")
    model.add_adapter("two", config)
    scramble(model)
    inputs = make_input("mlp")
    expected = {}
    for name in ("two", "one"):
        model.set_adapter(name)
        expected[name] = output(model, inputs)
    soralib.prune(model, adapter="one")
    assert model.peft_config["two"].kept_ranks == {}
    model.save_pretrained(tmp_path)
    for name in ("one", "two"):
        loaded = peft.PeftModel.from_pretrained(make_model("mlp"), tmp_path / name, adapter_name=name)
        torch.testing.assert_close(output(loaded, inputs), expected[name], atol=ATOL, rtol=0)
