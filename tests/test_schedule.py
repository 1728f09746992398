"""Threshold schedules, the LR multiplier and the budget controller's single step (soralib.schedule).

The controller's closed-loop behaviour, on simulated gates, is in test_budget.py.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soralib.schedule import (
    SCHEDULES,
    budget_threshold,
    budget_trajectory,
    explicit_thresholds,
    linear_warmup_decay,
    stage_thresholds,
)


def test_linear_is_evenly_spaced_from_start_to_end():
    assert stage_thresholds("linear", 0.1, 0.5, 5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_log_linear_is_geometric():
    values = stage_thresholds("log_linear", 1e-4, 1e-2, 5)
    assert values == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2])
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert ratios == pytest.approx([10**0.5] * 4)


def test_exp_linear_is_evenly_spaced_in_exp_space():
    values = stage_thresholds("exp_linear", 0.0, 2.0, 5)
    assert values[2] == pytest.approx(math.log((1 + math.e**2) / 2))
    gaps = [math.exp(b) - math.exp(a) for a, b in zip(values, values[1:])]
    assert gaps == pytest.approx([(math.e**2 - 1) / 4] * 4)


def test_exp_linear_keeps_precision_of_small_thresholds_and_does_not_overflow():
    # e^ξ ≈ 1 + ξ for small ξ: the schedule is then (nearly) linear, to full precision.
    small = stage_thresholds("exp_linear", 1e-5, 1e-4, 4)
    assert small == pytest.approx(stage_thresholds("linear", 1e-5, 1e-4, 4), rel=1e-4)
    big = stage_thresholds("exp_linear", 10.0, 1000.0, 3)  # e^1000 overflows a float
    assert big[1] == pytest.approx(1000 + math.log(0.5))


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_hits_its_endpoints_exactly(kind):
    values = stage_thresholds(kind, 3e-4, 7e-3, 6)
    assert len(values) == 6 and values[0] == 3e-4 and values[-1] == 7e-3


@pytest.mark.parametrize("kind", SCHEDULES)
def test_one_stage_is_start_and_equal_endpoints_are_constant(kind):
    assert stage_thresholds(kind, 0.2, 0.9, 1) == [0.2]
    assert stage_thresholds(kind, 0.3, 0.3, 4) == [0.3] * 4


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(SCHEDULES),
    a=st.floats(0, 50, allow_nan=False),
    b=st.floats(0, 50, allow_nan=False),
    num_stages=st.integers(1, 40),
)
def test_schedules_are_non_decreasing_and_stay_within_start_end(kind, a, b, num_stages):
    start, end = min(a, b), max(a, b)
    if kind == "log_linear":  # geometric spacing needs start > 0
        start, end = max(start, 1e-9), max(end, 1e-9)
    values = stage_thresholds(kind, start, end, num_stages)
    assert len(values) == num_stages and values[0] == start
    assert all(start <= v <= end for v in values)
    assert all(x <= y for x, y in zip(values, values[1:]))


@pytest.mark.parametrize(
    "args, message",
    [
        (("linear", 0.1, 0.2, 0), "num_stages must be an integer >= 1, got 0"),
        (("linear", 0.1, 0.2, 2.0), "num_stages must be an integer >= 1, got 2.0"),
        (("foo", 0.1, 0.2, 3), "unknown schedule 'foo'; allowed: linear, log_linear, exp_linear"),
        (("linear", -0.1, 0.2, 3), "start must be a finite threshold >= 0, got -0.1"),
        (("linear", 0.1, math.inf, 3), "end must be a finite threshold >= 0, got inf"),
        (("linear", 0.1, math.nan, 3), "end must be a finite threshold >= 0, got nan"),
        (("linear", "a", 0.2, 3), "start must be a finite threshold >= 0, got 'a'"),
        (("exp_linear", 0.5, 0.2, 3), "start must be <= end (thresholds only rise), got start=0.5 > end=0.2"),
        (("log_linear", 0.0, 0.2, 3), "log_linear needs start > 0"),
    ],
)
def test_bad_schedule_arguments_raise_one_line_naming_the_value(args, message):
    with pytest.raises(ValueError) as error:
        stage_thresholds(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_explicit_thresholds_accept_a_non_decreasing_list_as_floats():
    assert explicit_thresholds([0, 1e-4, 1e-4, 3e-3]) == [0.0, 1e-4, 1e-4, 3e-3]
    assert all(type(v) is float for v in explicit_thresholds([0, 1]))


@pytest.mark.parametrize(
    "values, message",
    [
        ([], "at least one value, got []"),
        ([0.1, -0.2], "thresholds[1] must be a finite threshold >= 0, got -0.2"),
        ([0.3, 0.2], "non-decreasing, got thresholds[1]=0.2 < thresholds[0]=0.3"),
        ([math.nan], "thresholds[0] must be a finite threshold >= 0, got nan"),
    ],
)
def test_explicit_thresholds_reject_negative_decreasing_or_empty(values, message):
    with pytest.raises(ValueError) as error:
        explicit_thresholds(values)
    assert message in str(error.value)


def test_warmup_rises_linearly_from_0_to_1_then_decays_linearly_to_0():
    m = [linear_warmup_decay(s, total_steps=110, warmup_steps=10) for s in (0, 5, 10, 60, 110, 200)]
    assert m == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_warmup_edge_cases_no_warmup_and_all_warmup():
    assert linear_warmup_decay(0, total_steps=100, warmup_steps=0) == 1.0
    assert linear_warmup_decay(25, total_steps=100, warmup_steps=0) == 0.75
    assert linear_warmup_decay(50, total_steps=100, warmup_steps=100) == 0.5
    assert linear_warmup_decay(100, total_steps=100, warmup_steps=100) == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 0), "total_steps must be an integer >= 1, got 0"),
        ((0, 10, 11), "warmup_steps must be in [0, total_steps=10], got 11"),
        ((0, 10, -1), "warmup_steps must be in [0, total_steps=10], got -1"),
        ((-1, 10, 2), "step must be >= 0, got -1"),
    ],
)
def test_bad_warmup_arguments_raise(args, message):
    with pytest.raises(ValueError) as error:
        linear_warmup_decay(*args)
    assert message in str(error.value)


def test_budget_trajectory_is_a_cubic_ramp_that_lands_at_final_fraction():
    assert budget_trajectory(1000, 200, 0.0) == 1000
    assert budget_trajectory(1000, 200, 0.375) == pytest.approx(200 + 800 / 8)  # (1 − 1/2)³
    assert budget_trajectory(1000, 200, 0.75) == 200
    assert budget_trajectory(1000, 200, 1.0) == 200
    assert budget_trajectory(1000, 200, 0.25, final_fraction=0.5) == pytest.approx(300)
    wants = [budget_trajectory(1000, 200, p / 100) for p in range(101)]
    assert all(x >= y for x, y in zip(wants, wants[1:]))


def test_budget_trajectory_rejects_bad_arguments():
    for kwargs, message in [
        (dict(progress=1.5), "progress must be in [0, 1], got 1.5"),
        (dict(target=2000), "target must be in (0, initial=1000], got 2000"),
        (dict(final_fraction=0), "final_fraction must be in (0, 1], got 0"),
    ]:
        with pytest.raises(ValueError) as error:
            budget_trajectory(**{"initial": 1000, "target": 200, "progress": 0.5, **kwargs})
        assert message in str(error.value)


def test_controller_raises_tau_above_the_wanted_count_and_lowers_it_below():
    assert budget_threshold(1e-3, kept=600, target=500, progress=1.0) == pytest.approx(1e-3 * math.exp(0.2 * 0.2))
    assert budget_threshold(1e-3, kept=400, target=500, progress=1.0) == pytest.approx(1e-3 * math.exp(-0.2 * 0.2))
    assert budget_threshold(1e-3, kept=500, target=500, progress=1.0) == pytest.approx(1e-3)


def test_controller_follows_the_trajectory_when_given_the_initial_count():
    # At progress 0 the trajectory still wants every parameter: a full adapter is on target.
    assert budget_threshold(1e-3, kept=1000, target=200, progress=0.0, initial=1000) == pytest.approx(1e-3)
    assert budget_threshold(1e-3, kept=1000, target=200, progress=0.0) > 1e-3


def test_controller_recovers_from_zero_and_is_clipped():
    tau = 0.0
    for _ in range(50):
        tau = budget_threshold(tau, kept=2000, target=1000, progress=0.5)
    assert tau > 1e-6 * math.exp(0.2 * 49)  # left the floor and kept climbing
    assert budget_threshold(0.9, kept=10**9, target=1, progress=1.0) == 1.0
    assert budget_threshold(0.0, kept=0, target=1000, progress=1.0, tau_min=1e-5) == 1e-5


def test_controller_rejects_bad_arguments():
    for kwargs, message in [
        (dict(gain=0), "gain must be > 0, got 0"),
        (dict(tau_min=0), "need 0 < tau_min <= tau_max, got tau_min=0, tau_max=1.0"),
        (dict(tau=-1.0), "tau must be a finite threshold >= 0, got -1.0"),
        (dict(kept=-5), "kept must be a finite count >= 0, got -5"),
        (dict(target=0), "target must be > 0, got 0"),
        (dict(progress=-0.1), "progress must be in [0, 1], got -0.1"),
    ]:
        with pytest.raises(ValueError) as error:
            budget_threshold(**{"tau": 1e-3, "kept": 10, "target": 10, "progress": 0.5, **kwargs})
        assert message in str(error.value)


def test_stage_thresholds_are_public_for_a_plain_loops_stages():
    import soralib

    assert soralib.stage_thresholds("linear", 0.0, 1e-3, 3) == [0.0, 5e-4, 1e-3]
