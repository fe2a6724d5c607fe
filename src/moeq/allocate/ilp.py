"""Integer programs for bit allocation, solved with scipy's HiGHS (``scipy.optimize.milp``).

- ``pmq_layer``: MC-MoE's pre-loading mixed-precision program for one layer: choose a width per
  expert minimising ``Σ_i f_i^α · w_i^β · err_i(b_i)`` (activation frequency, mean routing
  weight, quantization error) with ``Σ_i b_i <= E·b̄`` and at least one expert at the top and,
  with three or more widths, one at the second width.
- ``error_ilp``: one program over every expert of every layer: minimise ``Σ err(b)`` subject to
  one linear budget (bits or bytes) over all chosen widths.

Both take the candidate widths as given; each expert picks exactly one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

__all__ = ["AllocationInfeasible", "choose_widths", "pmq_layer", "error_ilp"]


class AllocationInfeasible(ValueError):
    """No assignment of widths meets the budget and constraints."""


def choose_widths(
    cost: np.ndarray,
    widths: Sequence[int],
    budget_coefficients: np.ndarray,
    budget: float,
    at_least_one: Sequence[int] = (),
) -> list[int]:
    """Solve ``min Σ cost[i, j] x[i, j]`` over one-hot rows ``x`` with a linear budget.

    Args:
        cost: ``[items, widths]``.
        widths: the candidate widths (columns of ``cost``).
        budget_coefficients: ``[items, widths]``, what choosing width j for item i spends.
        budget: the upper bound on the total spend.
        at_least_one: column indices that at least one item must choose.
    Returns the chosen width per item.
    """
    items, choices = cost.shape
    n = items * choices
    rows, cols, data = [], [], []
    for i in range(items):  # exactly one width per item
        rows += [i] * choices
        cols += list(range(i * choices, (i + 1) * choices))
        data += [1.0] * choices
    lower, upper = [1.0] * items, [1.0] * items
    rows += [items] * n  # the budget
    cols += list(range(n))
    data += list(np.asarray(budget_coefficients, dtype=np.float64).reshape(-1))
    lower.append(-np.inf)
    upper.append(float(budget))
    for k, column in enumerate(at_least_one):
        rows += [items + 1 + k] * items
        cols += [i * choices + column for i in range(items)]
        data += [1.0] * items
        lower.append(1.0)
        upper.append(np.inf)
    matrix = coo_matrix((data, (rows, cols)), shape=(items + 1 + len(at_least_one), n)).tocsr()
    result = milp(
        c=np.asarray(cost, dtype=np.float64).reshape(-1),
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(matrix, lower, upper),
    )
    if result.status != 0 or result.x is None:
        raise AllocationInfeasible(f"the integer program has no solution within the budget ({result.message})")
    chosen = np.asarray(result.x).reshape(items, choices).argmax(axis=1)
    return [int(widths[j]) for j in chosen]


def pmq_layer(
    frequency: Sequence[float],
    mean_weight: Sequence[float],
    errors: np.ndarray,
    widths: Sequence[int],
    avg_bits: float,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> list[int]:
    """MC-MoE's per-layer program; ``errors [experts, widths]``, widths high to low."""
    importance = np.power(np.asarray(frequency, dtype=np.float64), alpha) * np.power(np.asarray(mean_weight, dtype=np.float64), beta)
    cost = importance[:, None] * np.asarray(errors, dtype=np.float64)
    experts = len(frequency)
    bits = np.tile(np.asarray(widths, dtype=np.float64), (experts, 1))
    required = [0, 1] if len(widths) >= 3 else [0]
    least = (sum(widths[j] for j in required) + (experts - len(required)) * min(widths)) / experts
    if avg_bits < least - 1e-9:
        kept = " and ".join(f"{widths[j]}-bit" for j in required)
        raise AllocationInfeasible(f"pmq keeps at least one {kept} expert per layer (MC-MoE's rule), which needs at least "
                                   f"{least:.4g} mean bits with {experts} experts; raise --avg-bits or choose another strategy")
    return choose_widths(cost, widths, bits, avg_bits * experts + 1e-9, required)


def error_ilp(errors: np.ndarray, widths: Sequence[int], spend: np.ndarray, budget: float) -> list[int]:
    """Global program: ``errors`` and ``spend`` are ``[all experts, widths]``."""
    return choose_widths(np.asarray(errors, dtype=np.float64), widths, spend, budget)
