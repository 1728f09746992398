"""The proximal gate step: its closed form, when it runs (AMP, accumulation, a pruned model's old optimizer) and
what it touches, whatever the torch optimizer."""

import logging

import pytest
import torch

import soralib
from conftest import layers_of, make_input, scramble, sora_model, train_steps


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
    B = layers_of(model)[0].sora_B["default"].weight  # A has no gradient yet: B starts at zero
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

