"""Threshold schedules and the parameter-budget controller, as pure functions (stdlib only).

Notation: ``ξ`` is the sparsity strength of a stage of the sparsifying scheduler (Algorithm 1 of
Ding et al. 2023), ``τ`` the per-step threshold of the proximal gate update
``g ← T_τ(g) = sign(g)·max(|g| − τ, 0)``; "kept" counts adapter parameters of the ranks whose
gate is non-zero, ``Σ_modules kept_ranks·(in_features + out_features)``.
"""

from __future__ import annotations

import math
import numbers

SCHEDULES = ("linear", "log_linear", "exp_linear")


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite threshold >= 0, got {value!r}")


def stage_thresholds(kind: str, start: float, end: float, num_stages: int) -> list[float]:
    """Thresholds ``ξ_0 ≤ … ≤ ξ_{n−1}`` of the sparsifying scheduler, from ``start`` to ``end``.

    With ``n = num_stages`` and ``t_i = i / (n − 1)``:

    - ``"linear"``:     ``ξ_i = start + t_i·(end − start)``                (evenly spaced)
    - ``"log_linear"``: ``ξ_i = start·(end / start)^{t_i}``                (geometric, needs start > 0)
    - ``"exp_linear"``: ``ξ_i = log((1 − t_i)·e^{start} + t_i·e^{end})``  (evenly spaced in exp space),
      computed as ``end + log1p((1 − t_i)·expm1(start − end))``, which neither overflows for large
      thresholds nor loses the precision of small ones (for ``ξ ≪ 1`` it is close to ``"linear"``).

    Endpoints are exact: ``ξ_0 = start`` and ``ξ_{n−1} = end``. As ``numpy.linspace``, one stage gives
    ``[start]``.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    _check_threshold("start", start)
    _check_threshold("end", end)
    if start > end:
        raise ValueError(f"start must be <= end (thresholds only rise), got start={start!r} > end={end!r}")
    if kind == "log_linear" and start == 0:
        raise ValueError("log_linear needs start > 0 (geometric spacing from 0 is undefined), got start=0")
    if num_stages == 1:
        return [float(start)]
    values = []
    for i in range(num_stages):
        t = i / (num_stages - 1)
        if kind == "linear":
            value = start + t * (end - start)
        elif kind == "log_linear":
            value = start * math.exp(t * (math.log(end) - math.log(start)))
        else:
            value = end + math.log1p((1 - t) * math.expm1(start - end)) if t > 0 else start
        values.append(min(max(value, start), end))  # rounding must not step outside [start, end]
    values[0], values[-1] = float(start), float(end)
    return values


def explicit_thresholds(values: list[float]) -> list[float]:
    """A hand-written stage list ``[ξ_0, …]``, checked to be non-empty, ``≥ 0`` and non-decreasing."""
    if len(values) == 0:
        raise ValueError("explicit thresholds must list at least one value, got []")
    for i, value in enumerate(values):
        _check_threshold(f"thresholds[{i}]", value)
        if i > 0 and value < values[i - 1]:
            raise ValueError(
                f"thresholds must be non-decreasing, got thresholds[{i}]={value!r} < thresholds[{i - 1}]={values[i - 1]!r}"
            )
    return [float(v) for v in values]


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier (a ``LambdaLR`` lambda), as transformers' linear schedule with warmup:

    ``m(s) = s / w``              for ``s < w``   (0 → 1 over the warmup)
    ``m(s) = (T − s) / (T − w)``  for ``w ≤ s ≤ T``  (1 → 0 at ``T = total_steps``)
    ``m(s) = 0``                  for ``s ≥ T``
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / (total_steps - warmup_steps)


def budget_trajectory(initial: float, target: float, progress: float, final_fraction: float = 0.75) -> float:
    """Kept parameters wanted at ``progress`` ∈ [0, 1]: AdaLoRA's cubic ramp from ``initial`` to ``target``.

    ``want(p) = target + (initial − target)·(1 − p / f)³``  for ``p < f``,  ``want(p) = target``  after,
    with ``f = final_fraction``: the ramp is steep early, when gates are still far from settled, and flat
    as it lands, so the last ``1 − f`` of training fine-tunes at the final budget.
    """
    if not 0 < final_fraction <= 1:
        raise ValueError(f"final_fraction must be in (0, 1], got {final_fraction!r}")
    if not 0 <= progress <= 1:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    if not 0 < target <= initial:
        raise ValueError(f"target must be in (0, initial={initial!r}], got {target!r}")
    if progress >= final_fraction:
        return float(target)
    return target + (initial - target) * (1 - progress / final_fraction) ** 3


def budget_threshold(
    tau: float,
    kept: float,
    target: float,
    progress: float,
    *,
    initial: float | None = None,
    final_fraction: float = 0.75,
    # gain 0.2: the controller integrates err on log τ, so from the floor it needs about
    # ln(τ*/τ_min)/(gain·err) steps to reach a working threshold τ*: ~10 e-folds from 1e-6 to 1e-2,
    # ~100 steps at err ≈ 0.5. In the toy gate simulation of tests/test_budget.py, gains 0.1–0.4 all
    # settle on the target without oscillating (also with gate dynamics 10× slower than the test's),
    # 0.2 still lands in a 300-step run where 0.1 does not, and 0.05 is too slow to climb the decades
    # within 500 steps. A larger gain only adds step-to-step jitter to τ, hence 0.2 rather than 0.4.
    gain: float = 0.2,
    # τ_min 1e-6: the floor must sit below any threshold a run needs, since τ never goes under it, and
    # each decade below costs ~ln(10)/(gain·err) steps of climb. Next to O(1) gates 1e-6 is negligible
    # (it takes 1e6 steps to close a unit gate). It is also what lets τ leave 0, where a multiplicative
    # update would stay forever.
    tau_min: float = 1e-6,
    # τ_max 1.0: with O(1) gates a larger threshold zeroes every rank in one step; a cap, not a knob.
    tau_max: float = 1.0,
) -> float:
    """Next threshold τ from an integral controller on ``log τ`` that steers ``kept`` to the wanted count.

    ``want = budget_trajectory(initial, target, progress, final_fraction)`` (``= target`` without ``initial``),
    ``err = (kept − want) / want``,  ``τ' = clip(max(τ, τ_min)·exp(gain·err), τ_min, τ_max)``.

    Too many parameters kept raise τ (gates shrink faster and die), too few lower it (dead gates whose
    gradient beats τ come back). The update is multiplicative, so it works the same at any scale of τ;
    the scale only enters through the floor τ_min. Call it once per optimizer step, after the gate step.
    """
    if not 0 < gain:
        raise ValueError(f"gain must be > 0, got {gain!r}")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min!r}, tau_max={tau_max!r}")
    if not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite threshold >= 0, got {tau!r}")
    if not (math.isfinite(kept) and kept >= 0):
        raise ValueError(f"kept must be a finite count >= 0, got {kept!r}")
    if initial is None:
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target!r}")
        want = float(target)
    else:
        want = budget_trajectory(initial, target, progress, final_fraction)
    # τ_min is the floor: a τ of 0 (the natural start, plain LoRA) would stay 0 under a multiplicative update.
    step = min(gain * (kept - want) / want, 700.0)  # e^{>709} overflows; τ_max caps the result anyway
    tau = max(tau, tau_min) * math.exp(step)
    return min(max(tau, tau_min), tau_max)
