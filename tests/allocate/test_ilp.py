"""The integer programs find the same optimum as brute force on small instances."""

import itertools

import numpy as np
import pytest

from moeq.allocate.ilp import AllocationInfeasible, choose_widths, pmq_layer


def brute_force(cost, widths, spend, budget, at_least_one=()):
    best, best_choice = np.inf, None
    items, choices = cost.shape
    for choice in itertools.product(range(choices), repeat=items):
        if sum(spend[i, j] for i, j in enumerate(choice)) > budget + 1e-9:
            continue
        if any(column not in choice for column in at_least_one):
            continue
        total = sum(cost[i, j] for i, j in enumerate(choice))
        if total < best - 1e-12:
            best, best_choice = total, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    widths = [3, 2, 1]
    items = int(rng.integers(3, 7))
    errors = np.sort(rng.random((items, 3)), axis=1) * rng.random((items, 1)) * 10  # fewer bits, more error
    spend = np.tile(np.array(widths, dtype=float), (items, 1)) * rng.integers(1, 4, size=(items, 1))
    budget = float(spend[:, 1].sum())
    required = (0,) if seed % 2 else ()
    best, _ = brute_force(errors, widths, spend, budget, required)
    chosen = choose_widths(errors, widths, spend, budget, required)
    total = sum(errors[i, widths.index(b)] for i, b in enumerate(chosen))
    assert total == pytest.approx(best, abs=1e-9)
    assert sum(spend[i, widths.index(b)] for i, b in enumerate(chosen)) <= budget + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_pmq_matches_brute_force_with_its_constraints(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    widths = [3, 2, 1]
    experts = 6
    frequency, weight = rng.random(experts), rng.random(experts)
    errors = np.sort(rng.random((experts, 3)), axis=1)
    chosen = pmq_layer(frequency, weight, errors, widths, avg_bits=1.5)
    cost = (frequency * weight)[:, None] * errors
    spend = np.tile(np.array(widths, dtype=float), (experts, 1))
    best, _ = brute_force(cost, widths, spend, 1.5 * experts, (0, 1))
    assert sum(cost[i, widths.index(b)] for i, b in enumerate(chosen)) == pytest.approx(best, abs=1e-9)
    assert 3 in chosen and 2 in chosen and sum(chosen) <= 9


def test_infeasible_budget_is_named() -> None:
    with pytest.raises(AllocationInfeasible, match="no solution within the budget"):
        choose_widths(np.ones((3, 2)), [2, 1], np.array([[2.0, 1.0]] * 3), budget=2.0)


def test_pmq_names_the_least_budget_its_rule_allows() -> None:
    # {3,2}: one 3-bit expert of 8 is required, so the least mean is (3 + 7 * 2) / 8 = 2.125 bits.
    with pytest.raises(AllocationInfeasible, match="at least one 3-bit expert per layer .* at least 2.125 mean bits"):
        pmq_layer(np.ones(8), np.ones(8), np.ones((8, 2)), [3, 2], avg_bits=2.0)
    assert sorted(pmq_layer(np.ones(8), np.ones(8), np.ones((8, 2)), [3, 2], avg_bits=2.125)) == [2] * 7 + [3]
