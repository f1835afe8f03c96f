"""Convergence order of every deterministic sampler on the exact Gaussian-mixture problem.

Each sampler integrates the probability-flow ODE from sigma_max = 14.6 to sigma_min = 0.0292 on a Karras
schedule with 16, 32, 64 and 128 steps; the state at sigma_min is compared with a DOP853 solution at 1e-12
tolerance, and the slope of log(error) against log(steps) must fall in the band given (with its reason) in
`difusi.samplers.measure.ORDER_CASES`.
"""

import pytest

from difusi.samplers.measure import ORDER_CASES, measure_adaptive, measure_order, ode_problem


@pytest.fixture(scope="module")
def problem():
    return ode_problem(n_points=16, seed=0)


@pytest.mark.parametrize("case", ORDER_CASES, ids=[c.label for c in ORDER_CASES])
def test_fitted_order(case, problem):
    result = measure_order(case, *problem)
    low, high = case.expected
    assert low <= result["order"] <= high, (case.label, result["order"], result["errors"])
    assert all(a > b for a, b in zip(result["errors"], result["errors"][1:], strict=False)), result["errors"]


def test_higher_order_beats_lower_order_at_equal_evaluations(problem):
    """At ~64 evaluations: Heun (32 steps x 2) beats Euler (64 steps); DPM++ 2M (64) beats Heun."""
    errors = {}
    for case in ORDER_CASES:
        if case.label in ("Euler", "Heun", "DPM++ 2M"):
            steps = (32,) if case.label == "Heun" else (64,)
            errors[case.label] = measure_order(case, *problem, steps=steps)["errors"][0]
    assert errors["Heun"] < errors["Euler"] / 5
    assert errors["DPM++ 2M"] < errors["Heun"]


def test_dpm_adaptive_error_follows_its_tolerance(problem):
    result = measure_adaptive(*problem)
    errors, nfe = result["errors"], result["nfe"]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert all(a < b for a, b in zip(nfe, nfe[1:], strict=False)), nfe
    # Error per unit of requested tolerance stays bounded: tighter rtol really buys accuracy.
    assert all(e < 5 * rtol for e, rtol in zip(errors, result["rtols"], strict=True)), errors
