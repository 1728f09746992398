"""The proximal gate step: closed form, when it runs, what it touches, and what survives a save."""

import peft
import pytest
import torch

import soralib
from conftest import TARGETS, make_input, make_model, output, scramble, sora_model


def layers(model):
    return [m for m in model.modules() if isinstance(m, soralib.SoraLayer)]


def train_steps(model, optimizer, steps=3, arch="mlp"):
    inputs = make_input(arch)
    for _ in range(steps):
        out = model(**inputs)
        loss = (out if isinstance(out, torch.Tensor) else out.logits).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["fixed", "lr_scaled"])
def test_prox_step_equals_sgd_then_soft_threshold_closed_form(mode):
    model = sora_model("mlp")
    lr = 0.1
    threshold = 0.8 if mode == "fixed" else 8.0  # τ = 0.8 either way: some gates die, some survive
    opt = soralib.create_sora_optimizer(model, lr=lr, threshold=threshold, threshold_mode=mode,
                                        optimizer_cls=torch.optim.SGD)
    gates = soralib.gate_parameters(model)
    out = model(**make_input("mlp")).pow(2).mean() + sum((g * torch.arange(g.numel())).sum() for g in gates)
    out.backward()
    tau = threshold if mode == "fixed" else lr * threshold
    stepped = [g.detach() - lr * g.grad for g in gates]
    # closed form of the prox of τ|g|: shrink towards 0 by τ, exactly 0 inside [-τ, τ]
    expected = [torch.where(v.abs() > tau, v - torch.sign(v) * tau, torch.zeros_like(v)) for v in stepped]
    opt.step()
    flat = torch.cat(expected)
    assert bool((flat == 0).any()) and bool((flat != 0).any())
    for g, e in zip(gates, expected):
        torch.testing.assert_close(g.detach(), e)


def test_soft_threshold_zeroes_exactly_the_entries_within_tau_and_shrinks_the_rest():
    g = torch.tensor([-2.0, -0.3, -0.29, 0.0, 0.1, 0.3, 1.0])
    out = soralib.soft_threshold(g, 0.3)
    assert torch.equal(out, torch.tensor([-1.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7]))


def test_zero_gate_stays_zero_below_tau_and_comes_back_above():
    model = sora_model("mlp")
    gate = soralib.gate_parameters(model)[0]
    opt = soralib.create_sora_optimizer(model, lr=1.0, threshold=0.5, optimizer_cls=torch.optim.SGD)
    with torch.no_grad():
        gate.zero_()
    gate.grad = torch.full_like(gate, 0.4)   # step 0.4 < τ
    opt.step()
    assert torch.equal(gate.detach(), torch.zeros_like(gate))
    gate.grad = torch.full_like(gate, -0.9)  # step 0.9 > τ: back at 0.9 − 0.5
    opt.step()
    torch.testing.assert_close(gate.detach(), torch.full_like(gate, 0.4))


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
    a_weights = [l.sora_A["default"].weight for l in layers(model)]
    decayed = [g for g in opt.param_groups if g["weight_decay"] == 0.5][0]["params"]
    assert all(any(a is p for p in decayed) for a in a_weights)
    # zero gradients: AdamW's only move is decay, so decayed A shrinks and gates stay exactly 1
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    a_before = a_weights[0].detach().clone()
    opt.step()
    assert all(torch.equal(g.detach(), torch.ones_like(g)) for g in soralib.gate_parameters(model))
    torch.testing.assert_close(a_weights[0].detach(), a_before * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop,
                                 torch.optim.Adagrad, torch.optim.Adamax])
def test_prox_step_works_with_any_torch_optimizer(cls):
    model = sora_model("mlp")
    opt = soralib.create_sora_optimizer(model, lr=0.05, threshold=0.3, optimizer_cls=cls)
    train_steps(model, opt, steps=2)
    gates = torch.cat(soralib.gate_parameters(model))
    assert bool((gates == 0).any())
    assert isinstance(opt, cls)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("gate_update", ["optimizer", "sgd"])
@pytest.mark.parametrize("unscale", [False, True], ids=["scaled", "unscaled"])
def test_prox_step_is_skipped_when_amp_grad_scaler_skips_the_step(fused, gate_update, unscale):
    # GradScaler steps a fused optimizer even on an overflow (its kernel skips): the gates shrank by τ anyway
    model = sora_model("mlp")
    opt = soralib.create_sora_optimizer(model, lr=0.05, threshold=0.3, fused=fused, gate_update=gate_update)
    scaler = torch.amp.GradScaler("cpu")
    gates_before = [g.detach().clone() for g in soralib.gate_parameters(model)]
    loss = model(**make_input("mlp")).sum() * float("inf")
    scaler.scale(loss).backward()
    if unscale:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(g.detach(), b) for g, b in zip(soralib.gate_parameters(model), gates_before))


@pytest.mark.parametrize("unscale", [False, True], ids=["scaled", "unscaled"])
def test_plain_sgd_gates_step_on_unscaled_gradients_under_grad_scaler_with_a_fused_optimizer(unscale):
    # the fused kernel unscales A and B itself; the gates' own SGD step used gradients 1024 times too large
    def gates_after(scaled: bool):
        torch.manual_seed(0)
        model = sora_model("mlp")
        scramble(model, zero_fraction=0.0)  # B ≠ 0: the gates get a gradient
        opt = soralib.create_sora_optimizer(model, lr=0.05, fused=scaled, gate_update="sgd")
        loss = model(**make_input("mlp")).pow(2).mean()
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
        else:
            loss.backward()
            opt.step()
        return torch.cat([g.detach().clone() for g in soralib.gate_parameters(model)])
    torch.manual_seed(0)
    start = torch.cat([g.detach() for g in soralib.gate_parameters(sora_model("mlp"))])
    moved = gates_after(False)
    assert (moved - start).abs().max() > 1e-4
    torch.testing.assert_close(gates_after(True), moved, atol=1e-6, rtol=0)


def test_prox_step_is_skipped_on_gradient_accumulation_micro_steps():
    from accelerate import Accelerator

    model = sora_model("mlp")
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = soralib.create_sora_optimizer(model, lr=0.05, threshold=0.3)
    model, opt = accelerator.prepare(model, opt)
    gates = soralib.gate_parameters(model)
    snapshots = []
    for _ in range(2):
        with accelerator.accumulate(model):
            accelerator.backward(model(**make_input("mlp")).pow(2).mean())
            opt.step()
            opt.zero_grad()
        snapshots.append(torch.cat([g.detach().clone() for g in gates]))
    initial_nonzero = snapshots[0]
    assert not bool((initial_nonzero == 0).any()), "micro-step thresholded the gates"
    assert bool((snapshots[1] == 0).any()), "the real step did not threshold"


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
        for layer in layers(model):
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


def test_min_rank_spares_each_modules_largest_gates_from_the_threshold():
    model = sora_model("bert")
    opt = soralib.create_sora_optimizer(model, lr=1e-2, threshold=1e6, min_rank=2)
    train_steps(model, opt, steps=2, arch="bert")
    for gate in soralib.gate_parameters(model):
        assert int((gate != 0).sum()) == 2


def test_sgd_gates_take_the_papers_proximal_gradient_step_while_adamw_steps_a_and_b():
    model = sora_model("mlp")
    lr, lam = 0.1, 8.0  # τ = lr · λ = 0.8: some gates die, some survive
    opt = soralib.create_sora_optimizer(model, lr=lr, threshold=lam, threshold_mode="lr_scaled", gate_update="sgd")
    gates = soralib.gate_parameters(model)
    B = layers(model)[0].sora_B["default"].weight  # A has no gradient yet: B starts at zero
    B0 = B.detach().clone()
    out = model(**make_input("mlp")).pow(2).mean() + sum((g * torch.arange(g.numel())).sum() for g in gates)
    out.backward()
    stepped = [g.detach() - lr * g.grad for g in gates]
    expected = [torch.where(v.abs() > lr * lam, v - torch.sign(v) * lr * lam, torch.zeros_like(v)) for v in stepped]
    grads = [g.grad.clone() for g in gates]
    opt.step()
    for g, e, grad in zip(gates, expected, grads):
        torch.testing.assert_close(g.detach(), e)  # SGD then the soft-threshold, not AdamW's normalised step
        assert torch.equal(g.grad, grad)  # the gradient is back where zero_grad and others look
    assert not torch.equal(B.detach(), B0) and len(opt.state[B]) > 0  # B: AdamW
    assert all(len(opt.state[g]) == 0 for g in gates)  # no Adam moments for the gates
    assert "sora_gate_update" in opt.state_dict()["param_groups"][-1]
    opt.zero_grad()
    before = [g.detach().clone() for g in gates]
    opt.step()  # a skipped step (no gradients): the gates stay
    assert all(torch.equal(g, b) for g, b in zip(gates, before))
    with pytest.raises(ValueError, match="gate_update must be one of optimizer, sgd, got 'adam'"):
        soralib.create_sora_optimizer(model, lr=lr, gate_update="adam")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gates_cast_to_half_precision_after_wrapping_are_warned_about(dtype, caplog):
    import logging

    half = sora_model("mlp", gate_init="ones").to(dtype)  # the wrapped model cast: gates too
    with caplog.at_level(logging.WARNING, logger="soralib"):
        soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-4, threshold=3e-4)  # float32 gates: no warning
        assert not caplog.records
        opt = soralib.create_sora_optimizer(half, lr=1e-4, threshold=3e-4)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"SoRA gates are {dtype}"]
    # why it matters: τ = 3e-4 rounds away at gates of 1, so no gate ever shrinks
    before = [g.detach().clone() for g in soralib.gate_parameters(half)]
    for g in soralib.gate_parameters(half):
        g.grad = torch.zeros_like(g)
    opt.step()
    if dtype == torch.bfloat16:
        assert all(torch.equal(g, b) for g, b in zip(soralib.gate_parameters(half), before))


def test_stepping_an_optimizer_built_before_prune_is_refused_before_anything_moves():
    # prune replaces every SoRA tensor: the old optimizer stepped orphans, and only the head went on training
    model = sora_model("mlp")
    scramble(model)
    opt = soralib.create_sora_optimizer(model, lr=0.05)
    soralib.prune(model)
    model(**make_input("mlp")).pow(2).mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"this optimizer steps SoRA gates that soralib\.prune has replaced: the "
                                           r"model no longer has them.*build a new optimizer after prune"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    soralib.create_sora_optimizer(model, lr=0.05).step()  # the way on
