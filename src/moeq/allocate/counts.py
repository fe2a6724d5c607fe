"""How many experts of a layer get each width, for an average bit budget (PAPERS.md §1).

Two levels ``b_h > b_l`` and average ``b``: ``κ = clip((b - b_l)/(b_h - b_l), 0, 1)`` and
``n_high = round(κ·E)`` (Python's round, half to even); the rest get ``b_l``.

Three equally spaced levels ``b_h > b_m > b_l``: start from the two-level split of the pair
that brackets ``b`` ((b_h, b_m) if b >= b_m, else (b_m, b_l)). With ``Δ = b_h - b_l`` the region
is "high" if ``b > b_h - Δ/3``, "mid" if ``b >= b_h - 2Δ/3``, else "low". Then repeatedly turn
two ``b_m`` experts into one ``b_h`` and one ``b_l`` (the average is unchanged) while at least
two ``b_m`` remain; in region "mid" stop before the ``b_m`` count would fall below the number of
experts these moves have promoted to ``b_h``; in region "low" make no move.

The same counts apply to every MoE layer; which experts get which width is the ranking's job.
"""

from __future__ import annotations

__all__ = ["CountError", "two_level_counts", "three_level_counts", "level_counts", "validate_levels"]


class CountError(ValueError):
    """Levels or a budget the count rules cannot satisfy."""


def validate_levels(
    levels: tuple[int, ...] | list[int], num_experts: int, avg_bits: float | None = None, counted: bool = True
) -> tuple[int, ...]:
    """Levels sorted high to low, checked: distinct widths 1..8, budget in range, and for the
    count rules (``counted``) E >= number of levels."""
    ordered = tuple(sorted(set(levels), reverse=True))
    if len(ordered) != len(levels) or len(ordered) < 1:
        raise CountError(f"levels must be distinct bit widths, got {list(levels)}")
    if any(not isinstance(b, int) or not 1 <= b <= 8 for b in ordered):
        raise CountError(f"levels must be bit widths from 1 to 8, got {list(levels)}")
    if counted and num_experts < len(ordered):
        raise CountError(f"{len(ordered)} levels need at least {len(ordered)} experts per layer, this model has {num_experts}")
    if avg_bits is not None and not ordered[-1] <= avg_bits <= ordered[0]:
        raise CountError(
            f"average {avg_bits} bits lies outside the levels {list(ordered)}; choose a budget from {ordered[-1]} to {ordered[0]}"
        )
    return ordered


def two_level_counts(avg_bits: float, high: int, low: int, num_experts: int) -> dict[int, int]:
    """``{high: n_high, low: E - n_high}`` by the κ rule."""
    kappa = min(max((avg_bits - low) / (high - low), 0.0), 1.0)
    n_high = round(kappa * num_experts)
    return {high: n_high, low: num_experts - n_high}


def three_level_counts(avg_bits: float, levels: tuple[int, int, int], num_experts: int) -> dict[int, int]:
    """``{b_h: n, b_m: n, b_l: n}`` by the region rule (levels high to low, equally spaced)."""
    high, mid, low = levels
    if high - mid != mid - low:
        raise CountError(f"three levels must be equally spaced (like 3,2,1 or 4,3,2), got {list(levels)}")
    if avg_bits >= mid:
        split = two_level_counts(avg_bits, high, mid, num_experts)
        counts = {high: split[high], mid: split[mid], low: 0}
    else:
        split = two_level_counts(avg_bits, mid, low, num_experts)
        counts = {high: 0, mid: split[mid], low: split[low]}
    delta = high - low
    region = "high" if avg_bits > high - delta / 3 else "mid" if avg_bits >= high - 2 * delta / 3 else "low"
    promoted = 0
    while region != "low" and counts[mid] >= 2:
        if region == "mid" and counts[mid] - 2 < promoted + 1:
            break
        counts[mid] -= 2
        counts[high] += 1
        counts[low] += 1
        promoted += 1
    return counts


def level_counts(avg_bits: float, levels: tuple[int, ...] | list[int], num_experts: int) -> dict[int, int]:
    """Experts per width for one layer: two levels (κ rule) or three equally spaced (region rule)."""
    ordered = validate_levels(levels, num_experts, avg_bits)
    if len(ordered) == 1:
        return {ordered[0]: num_experts}
    if len(ordered) == 2:
        return two_level_counts(avg_bits, ordered[0], ordered[1], num_experts)
    if len(ordered) == 3:
        return three_level_counts(avg_bits, ordered, num_experts)
    raise CountError(
        f"the count rules take two or three levels, got {list(ordered)}; use --strategy error-ilp or pmq for more"
    )
