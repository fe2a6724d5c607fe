"""Orders of the experts of one layer, most protected (most bits) first, and widths from an order.

The paper's rule (PAPERS.md §1): order by Λ ascending, then one pass of variance promotion with
``ζ = 3``: visiting experts from the least protected up (the reverse of the Λ order), expert j
moves to the first (most protected) position k whose expert e has ``ζ·MaxVar(e) < MaxVar(j)``,
if k is above j. An expert only ever moves up. Ties in Λ keep the expert index order, so the
result is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = [
    "ascending_order",
    "descending_order",
    "promote_by_variance",
    "router_maxvar_order",
    "random_order",
    "widths_from_order",
    "ZETA",
]

ZETA = 3.0  # Popoviciu: a bounded distribution has at most 3x the variance of the uniform one


def ascending_order(values: Sequence[float]) -> list[int]:
    """Expert indices by value ascending; ties by index."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))


def descending_order(values: Sequence[float]) -> list[int]:
    """Expert indices by value descending; ties by index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def promote_by_variance(order: Sequence[int], maxvar: Sequence[float], zeta: float = ZETA) -> tuple[list[int], list[int]]:
    """One promotion pass over ``order``; returns the new order and the experts that moved."""
    current = list(order)
    moved = []
    for expert in reversed(list(order)):
        position = current.index(expert)
        target = next((k for k, other in enumerate(current) if zeta * maxvar[other] < maxvar[expert]), None)
        if target is not None and target < position:
            current.pop(position)
            current.insert(target, expert)
            moved.append(expert)
    return current, moved


def router_maxvar_order(router_change: Sequence[float], maxvar: Sequence[float], zeta: float = ZETA) -> tuple[list[int], list[int]]:
    """The paper's order: Λ ascending, then variance promotion."""
    return promote_by_variance(ascending_order(router_change), maxvar, zeta)


def random_order(num_experts: int, rng: random.Random) -> list[int]:
    order = list(range(num_experts))
    rng.shuffle(order)
    return order


def widths_from_order(order: Sequence[int], counts: dict[int, int]) -> list[int]:
    """Width per expert index: the first ``counts[b_max]`` of ``order`` get ``b_max``, and so on down."""
    widths = [0] * len(order)
    position = 0
    for bits in sorted(counts, reverse=True):
        for expert in order[position : position + counts[bits]]:
            widths[expert] = bits
        position += counts[bits]
    if position != len(order):
        raise ValueError(f"counts {counts} do not add up to {len(order)} experts")
    return widths
