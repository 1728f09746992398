"""How a budget run gets down to its size when every gate starts equal (gate_init="ones"): the threshold ramp
shrinks all gates alike, so they die together; the trim ramp keeps, step by step, the gates their own gradients
made largest, unshrunk."""

import pytest
import torch
from conftest import sora_model

import soralib
from soralib.budget import TRIM_WARMUP
from soralib.schedule import budget_trajectory

STEPS, R, KEEP = 400, 8, 4  # 4 of the 8 ranks of each module are favoured by their gradients, and the budget is 4


def run(ramp: str, seed: int = 0):
    """AdamW gates starting at 1, each pushed weakly (mean ±0.05 under noise 0.3) up if favoured, down if not.
    Returns the final gates, the favoured masks and the kept rank after each step."""
    model = sora_model("bert", r=R, gate_init="ones")
    gates = [layer.sora_gate["default"] for _, layer in soralib.optim.sora_layers(model)]
    gen = torch.Generator().manual_seed(seed)
    favoured = [torch.randperm(R, generator=gen) < KEEP for _ in gates]
    optimizer = soralib.create_sora_optimizer(model, lr=8e-4)
    budget = soralib.BudgetSchedule(model, optimizer, target_rank=KEEP, total_steps=STEPS, ramp=ramp)
    kept = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        for g, up in zip(gates, favoured):
            g.grad = torch.where(up, -0.05, 0.05) + 0.3 * torch.randn(R, generator=gen)
        optimizer.step()
        budget.step(step)
        kept.append(soralib.sparsity_report(model)["kept_rank"])
    budget.finish()
    return [g.detach() for g in gates], favoured, kept


def test_the_trim_ramp_keeps_the_ranks_the_gradients_favoured_unshrunk():
    gates, favoured, _ = run("trim")
    agree = sum(int(((g != 0) & up).sum()) for g, up in zip(gates, favoured))
    assert agree >= 0.95 * 12 * KEEP  # the budget is shared: a rank may go to a module whose own one it beat
    assert min(float(g[g != 0].abs().min()) for g in gates) > 0.9  # started at 1: no rank kept near zero


def test_the_trim_ramp_cuts_nothing_in_its_warm_up_then_follows_the_cubic_ramp():
    _, _, kept = run("trim", seed=1)
    initial, target = 12 * R, 12 * KEEP  # tiny BERT: 12 adapted modules
    for step, k in enumerate(kept, start=1):
        p = step / STEPS
        if p < TRIM_WARMUP:
            assert k == initial
        elif p < 0.75:
            want = budget_trajectory(initial, target, 0.75 * (p - TRIM_WARMUP) / (0.75 - TRIM_WARMUP))
            assert want - 1 < k <= want
        else:
            assert k == target


def test_the_threshold_ramp_shrinks_gates_that_start_equal_alike_so_they_die_together():
    # what the trim ramp is for: the budget is met, but with the unspared gates first all cut (min_rank 1 keeps
    # one per module) and the hold then refilled with gates revived from zero, far below the spared ones
    gates, _, _ = run("threshold")
    kept = torch.cat([g[g != 0].abs() for g in gates])
    assert len(kept) == 12 * KEEP
    assert int((kept < 0.1).sum()) >= len(kept) // 2


@pytest.mark.parametrize("ramp", ["fast", None])
def test_an_unknown_ramp_is_refused(ramp):
    model = sora_model("bert", r=R)
    optimizer = soralib.create_sora_optimizer(model, lr=8e-4)
    with pytest.raises(ValueError, match=f"ramp must be one of threshold, trim, got {ramp!r}"):
        soralib.BudgetSchedule(model, optimizer, target_rank=KEEP, total_steps=STEPS, ramp=ramp)
    with pytest.raises(ValueError, match="ramp must be one of threshold, trim"):
        soralib.SoraBudgetCallback(target_rank=KEEP, ramp=ramp)


def test_the_trim_ramp_takes_the_optimizers_threshold_out_from_the_first_step():
    # else the first step's prox step cut every gate under the optimizer's threshold, before any trim
    model = sora_model("bert", r=R)  # randn gates: a threshold of 0.5 would zero about 38 % of them at once
    optimizer = soralib.create_sora_optimizer(model, lr=8e-4, threshold=0.5)
    budget = soralib.BudgetSchedule(model, optimizer, target_rank=KEEP, total_steps=STEPS, ramp="trim")
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    budget.step(1)
    assert soralib.get_threshold(optimizer) == 0.0 and soralib.sparsity_report(model)["kept_rank"] == 12 * R
