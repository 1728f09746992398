"""The budget controller in closed loop with the real optimizer: AdamW gates, prox step, lr decaying to 0.

The toy simulation of test_budget.py takes plain gradient steps. AdamW differs where it matters: it moves a
dead gate by about the lr whatever its gradient, so dead gates keep reviving while lr > τ and stop when the
lr decays. That is what made MiniLM budget runs land 10–30 % under the budget (bench/runs/*-sora-budget-*).
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import TARGETS, make_input, make_model, sora_model

import soralib
from soralib.budget import trim_model_
from soralib.train.loop import BudgetController


def run_budget(target: float, measure: str, steps: int = 400, lr: float = 8e-4, seed: int = 0, min_rank: int = 0):
    """Gates pulled towards their own optimum g* (half of them 0) through AdamW + prox, lr warm-up then decay."""
    model = sora_model("bert", r=8)
    layers = [layer for _, layer in soralib.optim.sora_layers(model)]
    gates = [layer.sora_gate["default"] for layer in layers]
    gen = torch.Generator().manual_seed(seed)
    optimum = [torch.randn(len(g), generator=gen) * (torch.rand(len(g), generator=gen) < 0.5) for g in gates]
    optimizer = soralib.create_sora_optimizer(model, lr=lr, threshold=0.0, gate_group_kwargs={"eps": 1e-6},
                                              min_rank=min_rank)
    warmup = steps // 16
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: soralib.schedule.linear_warmup_decay(s, steps, warmup))
    controller = BudgetController(target, measure, min_rank)
    for step in range(steps):
        optimizer.zero_grad()
        for g, g_star in zip(gates, optimum):
            g.grad = (g.detach() - g_star) + 0.3 * torch.randn(len(g), generator=gen)
        optimizer.step()
        schedule.step()
        controller.on_step_end(None, SimpleNamespace(global_step=step + 1, max_steps=steps), None,
                               model=model, optimizer=optimizer)
        if step + 1 >= 0.75 * steps:  # the hold: within the budget after every step, not only at the end
            assert soralib.sparsity_report(model)[measure] <= max(target, min_rank * len(gates))
    before = [g.detach().clone() for g in gates]
    trim_model_(model, target, measure, min_rank)  # what the harness does after the last step
    assert all(torch.equal(a, g) for a, g in zip(before, gates)), "the hold should leave the final trim nothing"
    return soralib.sparsity_report(model)


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_rank_budget_lands_within_one_rank_under_adamw(fraction):
    target = fraction * 12 * 8  # tiny BERT: 12 target modules of r_max 8
    kept = run_budget(target, "kept_rank")["kept_rank"]
    assert target - 1 <= kept <= target


def test_parameter_budget_lands_within_5_percent_under_adamw():
    initial = soralib.sparsity_report(sora_model("bert", r=8))["lora_params_at_r_max"]
    kept = run_budget(0.4 * initial, "kept_params", seed=1)["kept_params"]
    assert 0.95 * 0.4 * initial <= kept <= 0.4 * initial


def test_held_budget_keeps_min_rank_in_every_module():
    report = run_budget(0.1 * 96, "kept_rank", min_rank=1)
    assert all(m["kept_rank"] >= 1 for m in report["modules"])


# soralib.BudgetSchedule: the same policy as a core object any loop steps.

def plain_loop(steps=200, seed=0, resume_at=None, min_rank=1, threshold_mode="fixed", kept=None, **budget):
    """The loop of `run_budget` with a `BudgetSchedule`: per-step thresholds and the final gates. With
    `resume_at`, everything is rebuilt from saved state dicts after that step, as a resumed run does; `kept`, a
    list, gets the kept rank after each step."""
    def build(state=None):
        model = sora_model("bert", r=8)
        optimizer = soralib.create_sora_optimizer(model, lr=8e-4, gate_group_kwargs={"eps": 1e-6}, min_rank=min_rank,
                                                  threshold_mode=threshold_mode)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: soralib.schedule.linear_warmup_decay(s, steps, steps // 16))
        if state is not None:
            for obj, saved in zip((model, optimizer, schedule), state):
                obj.load_state_dict(saved)
        return model, optimizer, schedule, soralib.BudgetSchedule(model, optimizer, total_steps=steps,
                                                                  min_rank=min_rank, **budget)

    model, optimizer, schedule, budget_schedule = build()
    gen = torch.Generator().manual_seed(seed)
    gates = soralib.gate_parameters(model)
    optimum = [torch.randn(len(g), generator=gen) * (torch.rand(len(g), generator=gen) < 0.5) for g in gates]
    thresholds = []
    for step in range(steps):
        optimizer.zero_grad()
        for g, g_star in zip(gates, optimum):
            g.grad = (g.detach() - g_star) + 0.3 * torch.randn(len(g), generator=gen)
        optimizer.step()
        schedule.step()
        budget_schedule.step(step + 1)
        thresholds.append(soralib.get_threshold(optimizer))
        if kept is not None:
            kept.append(soralib.sparsity_report(model)["kept_rank"])
        if step + 1 == resume_at:
            state = [obj.state_dict() for obj in (model, optimizer, schedule)]
            model, optimizer, schedule, budget_schedule = build(state)
            gates = soralib.gate_parameters(model)
    budget_schedule.finish()
    return thresholds, [g.detach().clone() for g in gates], model


def test_budget_schedule_steps_bit_for_bit_like_the_harness_controller():
    thresholds, gates, model = plain_loop(target_rank=4)
    # the harness's controller on the same loop: BudgetController's target is mean rank × modules
    model_c = sora_model("bert", r=8)
    optimizer = soralib.create_sora_optimizer(model_c, lr=8e-4, gate_group_kwargs={"eps": 1e-6}, min_rank=1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: soralib.schedule.linear_warmup_decay(s, 200, 12))
    controller = BudgetController(4 * 12, "kept_rank", 1)
    gen = torch.Generator().manual_seed(0)
    gates_c = soralib.gate_parameters(model_c)
    optimum = [torch.randn(len(g), generator=gen) * (torch.rand(len(g), generator=gen) < 0.5) for g in gates_c]
    expected = []
    for step in range(200):
        optimizer.zero_grad()
        for g, g_star in zip(gates_c, optimum):
            g.grad = (g.detach() - g_star) + 0.3 * torch.randn(len(g), generator=gen)
        optimizer.step()
        schedule.step()
        controller.on_step_end(None, SimpleNamespace(global_step=step + 1, max_steps=200), None, model=model_c,
                               optimizer=optimizer)
        expected.append(soralib.get_threshold(optimizer))
    trim_model_(model_c, 4 * 12, "kept_rank", 1)
    assert thresholds == expected and len(set(thresholds)) > 2  # the ramp moved τ, the hold set it to 0
    assert all(torch.equal(a, b) for a, b in zip(gates, gates_c))
    assert soralib.sparsity_report(model)["kept_rank"] == 4 * 12


def test_budget_schedule_in_lr_scaled_mode_ramps_down_as_in_fixed_mode():
    # the controller's cap of 1 applied to λ = τ / lr capped τ at the lr: the ramp cut nothing, the hold all at once
    fixed, scaled = [], []
    plain_loop(target_rank=4, kept=fixed)
    plain_loop(target_rank=4, threshold_mode="lr_scaled", kept=scaled)
    middle = int(0.6 * 200)  # the ramp wants about halfway between 96 and 48 ranks by now
    assert scaled[middle] < 0.9 * 96 and abs(scaled[middle] - fixed[middle]) <= 3, (scaled[middle], fixed[middle])


@pytest.mark.parametrize("resume_at", [60, 170], ids=["in-the-ramp", "in-the-hold"])
def test_budget_schedule_rebuilt_from_saved_state_dicts_goes_on_bit_for_bit(resume_at):
    full = soralib.sparsity_report(sora_model("bert", r=8))["lora_params_at_r_max"]
    straight = plain_loop(target_params=0.4 * full)
    resumed = plain_loop(target_params=0.4 * full, resume_at=resume_at)
    assert straight[0] == resumed[0]  # τ lives in the optimizer's state: the schedule keeps none of its own
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


@pytest.mark.parametrize("optimizer_min_rank, expected", [(0, 2), (3, 3)])
def test_budget_schedule_makes_the_prox_step_spare_min_rank_gates_per_module(optimizer_min_rank, expected):
    model = sora_model("bert", r=8)
    optimizer = soralib.create_sora_optimizer(model, lr=1e-3, min_rank=optimizer_min_rank)
    soralib.BudgetSchedule(model, optimizer, target_rank=4, total_steps=10, min_rank=2)
    assert [g["sora_min_rank"] for g in optimizer.param_groups if "sora_threshold" in g] == [expected]
    soralib.set_threshold(optimizer, 100.0)  # a threshold above every gate: only the spared ones live
    for g in soralib.gate_parameters(model):
        g.grad = torch.zeros_like(g)
    optimizer.step()
    assert all(m["kept_rank"] == expected for m in soralib.sparsity_report(model)["modules"])


def test_budget_schedule_trims_no_module_below_the_optimizers_min_rank():
    # create_sora_optimizer(min_rank=3) and the schedule's default min_rank 1: the trims cut modules to 1 rank
    model = sora_model("bert", r=4)
    optimizer = soralib.create_sora_optimizer(model, lr=1e-2, min_rank=3)
    schedule = soralib.BudgetSchedule(model, optimizer, target_rank=3, total_steps=8)
    inputs = make_input("bert")
    for step in range(1, 9):
        model(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step(step)
    schedule.finish()
    assert [m["kept_rank"] for m in soralib.sparsity_report(model)["modules"]] == [3] * 12
    with pytest.raises(ValueError, match=r"^target_rank must be in \[3, 4\] for this model \(min_rank 3, the "
                                         r"optimizer's, to the mean r_max of its 12 adapted modules\), got 1.5$"):
        soralib.BudgetSchedule(model, optimizer, target_rank=1.5, total_steps=8)


@pytest.mark.parametrize("other", [None, "default"], ids=["one-adapter-named-sft", "default-adapter-left-frozen"])
def test_budget_schedule_trims_the_active_adapter_whatever_its_name_and_leaves_the_others_alone(other):
    import peft

    model = make_model("bert")
    config = lambda: soralib.SoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["bert"][0])  # noqa: E731
    if other is None:
        model = peft.get_peft_model(model, config(), adapter_name="sft")
    else:  # a second adapter trained on a model that has one already
        model = peft.get_peft_model(model, config(), adapter_name=other)
        model.add_adapter("sft", config())
        model.set_adapter("sft")
    untouched = {name: p.detach().clone() for name, p in model.named_parameters() if "sora_gate.sft" not in name}
    schedule = soralib.BudgetSchedule(model, soralib.create_sora_optimizer(model, lr=1e-3), target_rank=2,
                                      total_steps=10)
    schedule.step(10)  # the hold: trimmed to the budget
    assert soralib.sparsity_report(model, adapter="sft")["kept_rank"] == 2 * 12
    schedule.finish()
    assert soralib.sparsity_report(model, adapter="sft")["kept_rank"] == 2 * 12
    assert all(torch.equal(p, untouched[name]) for name, p in model.named_parameters() if name in untouched)


def test_budget_schedule_refuses_a_model_training_two_adapters_at_once():
    # both adapters' gates took the budget's threshold, but only the first was measured and trimmed
    import peft

    model = peft.get_peft_model(make_model("bert"), soralib.SoraConfig(r=4, target_modules=TARGETS["bert"][0]))
    model.add_adapter("b", soralib.SoraConfig(r=4, target_modules=TARGETS["bert"][0]))
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match=r"^BudgetSchedule steers one adapter; this model trains 2 at once "
                                         r"\(default, b\): give each its own run, or set_adapter to one$"):
        soralib.BudgetSchedule(model, soralib.create_sora_optimizer(model, lr=1e-3), target_rank=2, total_steps=10)


def test_trim_of_an_adapter_the_model_lacks_is_refused():
    with pytest.raises(ValueError, match=r"^the model has no SoRA layers for adapter 'sft'$"):
        trim_model_(sora_model("bert"), 100, adapter="sft")


def _plain_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("kwargs, message", [
    ({"target_params": 100, "target_rank": 2}, "give target_params or target_rank, not both"),
    ({}, "give target_params (adapter parameters) or target_rank (mean rank per module), got neither"),
    ({"target_params": -5}, "target_params must be a finite number > 0, got -5"),
    ({"target_rank": float("nan")}, "target_rank must be a finite number > 0, got nan"),
    ({"target_rank": 2, "min_rank": 0.5}, "min_rank must be an integer >= 0, got 0.5"),
    ({"target_rank": 2, "final_fraction": 0}, "final_fraction must be in (0, 1], got 0"),
    ({"target_rank": 2, "total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
    ({"target_rank": 9}, ("target_rank must be in [1, 8] for this model (min_rank 1 to the mean r_max of its 12 "
                          "adapted modules), got 9")),
    ({"target_rank": 0.5}, "target_rank must be in [1, 8] for this model"),
    ({"target_params": 100}, ("target_params must be in [832, 6656] for this model (min_rank 1 to r_max ranks in "
                              "each of its 12 adapted modules), got 100")),
    # min_rank 0: a budget below one rank (64 parameters here) keeps no rank at all, whatever the training does
    ({"target_params": 10, "min_rank": 0}, ("target_params must be in [64, 6656] for this model (min_rank 0, yet "
                                            "one rank at least, to r_max ranks in each of its 12 adapted modules), "
                                            "got 10")),
    ({"target_rank": 0.05, "min_rank": 0}, ("target_rank must be in [0.0833333, 8] for this model (min_rank 0, yet one "
                                            "rank at least, to the mean r_max of its 12 adapted modules), got 0.05")),
    ({"target_rank": 2, "optimizer": _plain_optimizer},
     "this optimizer has no SoRA gate group; build it with soralib.create_sora_optimizer"),
], ids=["both", "neither", "params-negative", "rank-nan", "min-rank-float", "final-fraction", "total-steps",
        "rank-above-r", "rank-below-min-rank", "params-below-min-rank", "params-below-one-rank-min-rank-0",
        "rank-below-one-rank-min-rank-0", "no-gate-group"])
def test_budget_schedule_rejects_bad_arguments_in_one_line(kwargs, message):
    model = sora_model("bert", r=8)
    optimizer = kwargs.pop("optimizer", lambda m: soralib.create_sora_optimizer(m, lr=1e-3))(model)
    with pytest.raises(ValueError) as err:
        soralib.BudgetSchedule(model, optimizer, **{"total_steps": 10, **kwargs})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_budget_schedule_step_rejects_a_negative_step():
    model = sora_model("bert", r=8)
    schedule = soralib.BudgetSchedule(model, soralib.create_sora_optimizer(model, lr=1e-3), target_rank=2,
                                      total_steps=10)
    with pytest.raises(ValueError, match=r"global_step must be an integer >= 0, got -1"):
        schedule.step(-1)
