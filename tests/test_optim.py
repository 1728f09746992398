"""Optimizers built for SoRA: what trains, weight decay, gate_l1, the threshold in a saved state dict, the Trainer
form, gate settings that would do nothing."""

import peft
import pytest
import torch

import soralib
from conftest import TARGETS, layers_of, make_input, make_model, output, sora_model, train_steps
from rejection_helpers import one_line


def test_huge_threshold_zeroes_every_gate_and_the_model_equals_the_base():
    model = peft.get_peft_model(make_model("bert"), soralib.SoraConfig(r=4, target_modules=TARGETS["bert"][0]))
    opt = soralib.create_sora_optimizer(model, lr=1e-2, threshold=1e6)
    train_steps(model, opt, steps=2, arch="bert")
    assert all(bool((g == 0).all()) for g in soralib.gate_parameters(model))
    assert soralib.sparsity_report(model)["kept_params"] == 0
    inputs = make_input("bert")
    torch.testing.assert_close(output(model, inputs), output(make_model("bert"), inputs), atol=1e-6, rtol=0)


def test_training_changes_only_adapter_and_modules_to_save_parameters():
    model = sora_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = soralib.create_sora_optimizer(model, lr=1e-2, weight_decay=0.1, threshold=1e-3)
    train_steps(model, opt, arch="bert")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing trained"
    assert all(".sora_" in n or ".modules_to_save." in n for n in changed), sorted(changed)[:5]
    assert any(".sora_gate" in n for n in changed) and any(".modules_to_save." in n for n in changed)


def test_gates_are_never_weight_decayed_and_a_b_are():
    model = sora_model("mlp", gate_init="ones")
    opt = soralib.create_sora_optimizer(model, lr=0.1, weight_decay=0.5, threshold=0.0)
    gate_ids = {id(g) for g in soralib.gate_parameters(model)}
    for group in opt.param_groups:
        has_gates = any(id(p) in gate_ids for p in group["params"])
        assert not has_gates or (group["weight_decay"] == 0 and all(id(p) in gate_ids for p in group["params"]))
    a_weights = [l.sora_A["default"].weight for l in layers_of(model)]
    decayed = [g for g in opt.param_groups if g["weight_decay"] == 0.5][0]["params"]
    assert all(any(a is p for p in decayed) for a in a_weights)
    # zero gradients: AdamW's only move is decay, so decayed A shrinks and gates stay exactly 1
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    a_before = a_weights[0].detach().clone()
    opt.step()
    assert all(torch.equal(g.detach(), torch.ones_like(g)) for g in soralib.gate_parameters(model))
    torch.testing.assert_close(a_weights[0].detach(), a_before * (1 - 0.1 * 0.5))


def test_threshold_and_mode_survive_an_optimizer_state_dict_round_trip():
    model = sora_model("mlp")
    opt = soralib.create_sora_optimizer(model, lr=0.05, threshold=0.01, threshold_mode="lr_scaled")
    train_steps(model, opt)
    soralib.set_threshold(opt, 0.7)
    state = opt.state_dict()
    fresh = soralib.create_sora_optimizer(model, lr=0.05, threshold=0.0)
    fresh.load_state_dict(state)
    assert soralib.get_threshold(fresh) == 0.7
    gate_group = next(g for g in fresh.param_groups if "sora_threshold" in g)
    assert gate_group["sora_threshold_mode"] == "lr_scaled"
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_gate_l1_is_the_mean_absolute_gate_and_has_a_gradient():
    model = sora_model("mlp")
    gates = soralib.gate_parameters(model)
    value = soralib.gate_l1(model)
    expected = torch.cat([g.detach() for g in gates]).abs().mean()
    torch.testing.assert_close(value.detach(), expected)
    value.backward()
    n = sum(g.numel() for g in gates)
    torch.testing.assert_close(gates[0].grad, torch.sign(gates[0].detach()) / n)


def test_gate_l1_of_an_adapter_pruned_to_nothing_is_zero_not_nan():
    model = sora_model("mlp")
    with torch.no_grad():
        for gate in soralib.gate_parameters(model):
            gate.zero_()
    soralib.prune(model)
    assert soralib.gate_l1(model).item() == 0.0


def test_gate_l1_counts_only_the_gates_of_the_active_adapter():
    model = sora_model("mlp", gate_init="ones")
    model.add_adapter("other", soralib.SoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["mlp"][0]))
    with torch.no_grad():
        for layer in layers_of(model):
            layer.sora_gate["other"].zero_()
    assert soralib.gate_l1(model).item() == 1.0  # "default" is active; "other"'s zero gates do not count
    assert soralib.gate_l1(model, adapter="other").item() == 0.0
    model.set_adapter("other")
    assert soralib.gate_l1(model).item() == 0.0


def test_trainer_optimizer_form_uses_the_given_lr_and_gate_group(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = sora_model("bert")
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, weight_decay=0.1, report_to=[],
                             use_cpu=True, max_steps=1)
    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=soralib.trainer_optimizer_cls_and_kwargs(
        lr=args.learning_rate, weight_decay=args.weight_decay, threshold=1e-3))
    opt = trainer.create_optimizer()
    gate_group = next(g for g in opt.param_groups if "sora_threshold" in g)
    assert gate_group["weight_decay"] == 0 and gate_group["sora_threshold"] == 1e-3
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)
    assert {id(p) for p in gate_group["params"]} == {id(g) for g in soralib.gate_parameters(model)}


def test_a_min_rank_above_every_modules_r_max_is_refused_as_it_would_prune_nothing():
    # sora train refuses --min-rank 9 with r 8; the library spared every gate, silently: SoRA trained as LoRA
    expected = "min_rank must be <= r_max (4: no module has more ranks to keep, so none would ever be pruned), got 5"
    for kwargs in ({"min_rank": 5}, {"gate_group_kwargs": {"sora_min_rank": 5}}):
        with pytest.raises(ValueError) as excinfo:
            soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, **kwargs)
        assert one_line(excinfo) == expected
    model = sora_model("mlp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [list(g["params"]) for g in optimizer.param_groups]
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraCallback(threshold=1e-3, min_rank=5).on_train_begin(None, None, None, model=model,
                                                                        optimizer=optimizer, lr_scheduler=None)
    assert one_line(excinfo) == expected
    assert [list(g["params"]) for g in optimizer.param_groups] == before
    soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, min_rank=4)  # every rank kept: allowed, as in sora train


def test_an_optimizer_setting_for_plain_sgd_gates_is_refused_as_it_would_do_nothing():
    # the README's gate_group_kwargs={"eps": 1e-6} kept when switching to gate_update="sgd": silently ignored
    # (sora train refuses --gate-eps with --gate-update sgd)
    expected = ("gate_group_kwargs key 'eps' is a setting of the optimizer's own update, which gate_update 'sgd' gates "
                "do not take (plain SGD at the group's lr): drop it, or use gate_update 'optimizer'")
    for build in (lambda: soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_update="sgd",
                                                        gate_group_kwargs={"eps": 1e-6, "lr": 1e-2}),
                  lambda: soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_group_kwargs={
                      "sora_gate_update": "sgd", "eps": 1e-6}),
                  lambda: soralib.SoraCallback(threshold=1e-3, gate_update="sgd", gate_group_kwargs={"eps": 1e-6}),
                  lambda: soralib.trainer_optimizer_cls_and_kwargs(lr=1e-3, gate_update="sgd",
                                                                   gate_group_kwargs={"eps": 1e-6})):
        with pytest.raises(ValueError) as excinfo:
            build()
        assert one_line(excinfo) == expected
    # what plain SGD gates do read, and tags, pass
    soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_update="sgd",
                                  gate_group_kwargs={"lr": 1e-2, "name": "gates", "sora_min_rank": 1})
