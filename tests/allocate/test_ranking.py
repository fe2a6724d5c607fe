"""The paper's ranking: Λ ascending, ζ-promotion by MaxVar, and the widths an order gets."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.allocate.ranking import (
    ascending_order,
    descending_order,
    promote_by_variance,
    router_maxvar_order,
    widths_from_order,
)
from moeq.allocate.scores import max_var, router_norm_change


def test_order_is_lambda_ascending_with_ties_by_index() -> None:
    assert ascending_order([0.3, -0.1, 0.3, 0.0]) == [1, 3, 0, 2]
    assert descending_order([0.3, -0.1, 0.3, 0.0]) == [0, 2, 3, 1]


def test_promotion_moves_a_high_variance_expert_above_the_first_low_variance_one() -> None:
    # Λ order: 0, 1, 2, 3. MaxVar of expert 3 exceeds 3x that of expert 1 (but not of expert 0).
    order, moved = router_maxvar_order([0.1, 0.2, 0.3, 0.4], [1.0, 0.2, 0.5, 0.9])
    assert order == [0, 3, 1, 2] and moved == [3]


def test_promotion_goes_to_the_most_protected_qualifying_position() -> None:
    order, moved = router_maxvar_order([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.5, 0.9])
    # Expert 3 (0.9 > 3 x 0.1) goes to position 0, above expert 0. Then expert 2 (0.5): expert 3 now
    # at position 0 does not qualify (3 x 0.9 > 0.5), expert 0 does, so 2 lands just above expert 0.
    assert order == [3, 2, 0, 1] and moved == [3, 2]


def test_no_move_when_no_expert_is_three_times_smaller() -> None:
    order, moved = router_maxvar_order([0.4, 0.3, 0.2, 0.1], [1.0, 0.5, 0.4, 0.9])
    assert order == [3, 2, 1, 0] and moved == []


def test_equal_variance_does_not_move() -> None:
    assert promote_by_variance([0, 1, 2], [0.25, 0.25, 0.75], zeta=3.0) == ([0, 1, 2], [])  # 3 x 0.25 is not < 0.75


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1, 1), st.floats(1e-4, 1.0)), min_size=1, max_size=24))
def test_promotion_only_moves_up_and_keeps_a_permutation(pairs) -> None:
    change = [c for c, _ in pairs]
    maxvar = [v for _, v in pairs]
    before = ascending_order(change)
    after, moved = promote_by_variance(before, maxvar)
    assert sorted(after) == list(range(len(pairs)))
    # Only moves up: no moved expert ends below an unmoved expert that stood below it before.
    for expert in moved:
        for other in set(before) - set(moved):
            if before.index(other) > before.index(expert):
                assert after.index(other) > after.index(expert)
    # Experts that were not moved keep their relative order.
    still = [e for e in after if e not in moved]
    assert still == [e for e in before if e not in moved]


def test_widths_from_order() -> None:
    assert widths_from_order([2, 0, 3, 1], {3: 1, 2: 2, 1: 1}) == [2, 1, 3, 2]
    with pytest.raises(ValueError, match="do not add up"):
        widths_from_order([0, 1], {3: 1})


def test_router_norm_change_is_a_difference_of_norms() -> None:
    initial = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    final = torch.tensor([[0.0, 6.0], [0.0, -1.0]])
    # ‖(0,6)‖ - ‖(3,4)‖ = 1; ‖(0,-1)‖ - ‖(1,0)‖ = 0 (the norm of the difference would be sqrt(2)).
    assert router_norm_change(final, initial).tolist() == [1.0, 0.0]
    assert router_norm_change(final).tolist() == [6.0, 1.0]  # the final-norm proxy
    with pytest.raises(ValueError, match="same architecture"):
        router_norm_change(final, initial[:1])


def test_maxvar_against_a_direct_computation() -> None:
    rng = random.Random(0)
    rows = [[rng.gauss(0, 1 + r) for _ in range(16)] for r in range(5)]

    def variance(xs, ddof):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - ddof)
    w = torch.tensor(rows, dtype=torch.float64)
    assert max_var(w) == pytest.approx(max(variance(r, 0) for r in rows), rel=1e-12)
    largest = max(rows, key=lambda r: sum(x * x for x in r))
    assert max_var(w, "authors") == pytest.approx(variance(largest, 1), rel=1e-12)
    with pytest.raises(ValueError, match="unknown MaxVar variant"):
        max_var(w, "median")
