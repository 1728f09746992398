"""The parameter budget: trim_to_budget / apply_masks_ (soralib.budget), and the budget controller of
soralib.schedule run in closed loop on simulated gates, followed by the final trim."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soralib.budget import apply_masks_, kept_cost, trim_to_budget
from soralib.schedule import budget_threshold

# Six modules of different shapes: cost of a rank = in_features + out_features.
COSTS = [768 + 768, 768 + 3072, 3072 + 768, 1024 + 1024, 512 + 2048, 768 + 768]
SCALES = [1.0, 0.8, 0.6, 1.2, 0.4, 0.2]  # how much each module's ranks matter; the last one barely does


def simulate(fraction, seed=0, steps=500, r=64, eta=0.05, sigma=0.002):
    """Toy SoRA training steered by the budget controller from τ = 0 to ``fraction`` of the initial size.

    Each gate follows a proximal gradient step on ``½(g − g*)²`` plus gradient noise,
    ``g ← T_τ(g + η(g* − g) + σε)``: a fixed random drift towards its own optimum ``g* ~ N(0, scale²)``.
    Left alone it settles at ``T_{τ/η}(g*)``, so τ decides which ranks live, as in SoRA.
    """
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor(SCALES)[:, None]
    optimum = scales * torch.randn(len(COSTS), r, generator=gen)
    gates = list(torch.randn(len(COSTS), r, generator=gen))
    initial = kept_cost(gates, COSTS)
    target = fraction * initial
    tau = 0.0
    for step in range(steps):
        for i, g in enumerate(gates):
            x = g + eta * (optimum[i] - g) + sigma * torch.randn(r, generator=gen)
            gates[i] = x.sign() * (x.abs() - tau).clamp(min=0)
        tau = budget_threshold(tau, kept_cost(gates, COSTS), target, (step + 1) / steps, initial=initial)
    return gates, target


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_controller_lands_within_5_percent_of_the_target_from_tau_zero(fraction):
    gates, target = simulate(fraction)
    assert kept_cost(gates, COSTS) == pytest.approx(target, rel=0.05)


def test_final_trim_puts_the_controlled_adapter_within_budget_losing_little():
    gates, target = simulate(0.5, seed=1)
    masks = trim_to_budget(gates, COSTS, int(target))
    apply_masks_(gates, masks)
    assert 0.95 * target <= kept_cost(gates, COSTS) <= target


def test_min_rank_keeps_every_live_module_alive_through_a_hard_trim():
    gates, _ = simulate(0.5)
    assert all(bool((g != 0).any()) for g in gates)
    budget = int(0.15 * sum(len(g) * c for g, c in zip(gates, COSTS)))

    plain = trim_to_budget(gates, COSTS, budget)
    assert any(not m.any() for m in plain), "the weakest module should lose all its ranks"
    assert all(torch.equal(a, b) for a, b in zip(plain, _reference_trim(gates, COSTS, budget, 0)))  # no special treatment

    kept = [int(m.sum()) for m in trim_to_budget(gates, COSTS, budget, min_rank=1)]
    assert all(k >= 1 for k in kept)
    assert sum(k * c for k, c in zip(kept, COSTS)) <= budget + sum(COSTS)  # over only by the forced ranks


def _reference_trim(gates, costs, budget, min_rank):
    """The definition, one rank at a time: each module's min_rank largest non-zero gates, then the greedy prefix."""
    masks, spent, ranking = [torch.zeros(len(g), dtype=torch.bool) for g in gates], 0, []
    for i, g in enumerate(gates):
        ranks = sorted((-abs(float(v)), j) for j, v in enumerate(g) if v != 0)
        for _, j in ranks[:min_rank]:
            masks[i][j], spent = True, spent + costs[i]
        ranking += [(v, i, j) for v, j in ranks[min_rank:]]
    for _, i, j in sorted(ranking):
        if spent + costs[i] > budget:
            break
        masks[i][j], spent = True, spent + costs[i]
    return masks


def test_trim_example_by_hand():
    gates = [torch.tensor([0.9, 0.0, 0.1]), torch.tensor([0.5, -0.7])]
    masks = trim_to_budget(gates, [10, 20], budget=40)  # 0.9 (10) then -0.7 (20); 0.5 would overflow
    assert [m.tolist() for m in masks] == [[True, False, False], [False, True]]
    masks = trim_to_budget(gates, [10, 20], budget=5, min_rank=1)  # forced ranks alone exceed the budget
    assert [m.tolist() for m in masks] == [[True, False, False], [False, True]]


def test_a_float_or_huge_budget_and_a_huge_min_rank_are_exact():
    # Against a float budget an int64 tensor compares in float32, where 2**24 + 1 rounds to 2**24.
    assert trim_to_budget([torch.ones(1)], [2**24 + 1], float(2**24))[0].tolist() == [False]
    assert trim_to_budget([torch.ones(2)], [15_000_001], 30_000_001.5)[0].tolist() == [True, False]  # 2 need 30_000_002
    assert trim_to_budget([torch.ones(3)], [7], 10**20)[0].tolist() == [True] * 3
    assert trim_to_budget([torch.tensor([1.0, 0.0])], [7], 0, min_rank=2**70)[0].tolist() == [True, False]


def test_min_rank_cannot_revive_a_dead_module():
    masks = trim_to_budget([torch.zeros(4), torch.tensor([1.0, 2.0])], [3, 3], budget=0, min_rank=2)
    assert [m.tolist() for m in masks] == [[False] * 4, [True, True]]


def test_apply_masks_zeroes_dropped_gates_of_a_trainable_parameter_in_place():
    gate = torch.nn.Parameter(torch.tensor([0.5, -0.25, 2.0]))
    apply_masks_([gate], [torch.tensor([True, False, True])])
    assert gate.tolist() == [0.5, 0.0, 2.0] and gate.requires_grad


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: trim_to_budget([torch.ones(2)], [], 5), "same length, got 1 gates and 0 costs"),
        (lambda: trim_to_budget([torch.ones(2)], [0], 5), "costs[0] must be a positive integer"),
        (lambda: trim_to_budget([torch.ones(2, 2)], [3], 5), "gates[0] must be a 1-D gate vector, got shape (2, 2)"),
        (lambda: trim_to_budget([torch.tensor([float("nan")])], [3], 5), "gates[0] must be finite"),
        (lambda: trim_to_budget([torch.ones(2)], [3], -1), "budget must be >= 0 parameters, got -1"),
        (lambda: trim_to_budget([torch.ones(2)], [3], 5, min_rank=-1), "min_rank must be an integer >= 0, got -1"),
        (lambda: apply_masks_([torch.ones(2)], [torch.ones(2)]), "masks[0] must be a bool tensor"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


# Gate values drawn from a few integers make zeros and ties common; floats cover the rest.
gate_value = st.one_of(st.integers(-3, 3).map(float), st.floats(-2, 2, allow_nan=False, allow_subnormal=False))
problem = st.lists(st.tuples(st.lists(gate_value, min_size=1, max_size=8), st.integers(1, 40)), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None)
@given(problem=problem, budget=st.integers(0, 400), min_rank=st.integers(0, 3))
def test_trim_properties(problem, budget, min_rank):
    gates = [torch.tensor(values) for values, _ in problem]
    costs = [cost for _, cost in problem]
    before = [g.clone() for g in gates]
    masks = trim_to_budget(gates, costs, budget, min_rank)
    assert all(torch.equal(g, b) for g, b in zip(gates, before))  # pure: gates untouched

    nonzero = [g != 0 for g in gates]
    assert all(m.dtype == torch.bool and not (m & ~nz).any() for m, nz in zip(masks, nonzero))  # zeros stay zero

    forced = [min(min_rank, int(nz.sum())) for nz in nonzero]
    assert all(int(m.sum()) >= f for m, f in zip(masks, forced))
    spent = sum(int(m.sum()) * c for m, c in zip(masks, costs))
    assert spent <= max(budget, sum(f * c for f, c in zip(forced, costs)))
    if min_rank == 0:
        assert spent <= budget

    dropped = [(abs(float(v)), costs[i]) for i, g in enumerate(gates) for j, v in enumerate(g) if nonzero[i][j] and not masks[i][j]]
    if not dropped:
        return
    largest = max(d for d, _ in dropped)
    # Largest gates first: a kept gate smaller than a dropped one can only be one of min_rank forced per module.
    for g, m in zip(gates, masks):
        assert int((g.abs()[m] < largest).sum()) <= min_rank
    # Greedy: it stopped because the next gate in line did not fit.
    assert spent + max(c for d, c in dropped if d == largest) > budget


@settings(max_examples=300, deadline=None)
@given(problem=problem, budget=st.integers(0, 400), min_rank=st.integers(0, 3))
def test_vectorised_trim_equals_the_rank_by_rank_definition(problem, budget, min_rank):
    gates = [torch.tensor(values) for values, _ in problem]
    costs = [cost for _, cost in problem]
    masks = trim_to_budget(gates, costs, budget, min_rank)
    assert [m.tolist() for m in masks] == [m.tolist() for m in _reference_trim(gates, costs, budget, min_rank)]


@settings(max_examples=100, deadline=None)
@given(problem=problem, min_rank=st.integers(0, 3))
def test_trim_keeps_every_nonzero_gate_when_the_budget_allows(problem, min_rank):
    gates = [torch.tensor(values) for values, _ in problem]
    costs = [cost for _, cost in problem]
    masks = trim_to_budget(gates, costs, kept_cost(gates, costs), min_rank)
    assert all(torch.equal(m, g != 0) for m, g in zip(masks, gates))
    apply_masks_(gates, masks)
    assert kept_cost(gates, costs) == sum(int(m.sum()) * c for m, c in zip(masks, costs))
