"""The count rules reproduce PAPERS.md's table exactly and refuse impossible inputs."""

import pytest

from moeq.allocate.counts import CountError, level_counts, two_level_counts

# avg bits -> (n_1bit, n_2bit, n_3bit) for levels (3, 2, 1); PAPERS.md §1.
TABLE = {
    1.5: {8: (4, 4, 0), 64: (32, 32, 0)},
    1.75: {8: (4, 2, 2), 64: (32, 16, 16)},
    2.0: {8: (2, 4, 2), 64: (21, 22, 21)},
    2.125: {8: (2, 3, 3), 64: (18, 20, 26)},
    2.25: {8: (2, 2, 4), 64: (16, 16, 32)},
    2.5: {8: (2, 0, 6), 64: (16, 0, 48)},
    2.75: {8: (1, 0, 7), 64: (8, 0, 56)},
}


@pytest.mark.parametrize("avg_bits", sorted(TABLE))
@pytest.mark.parametrize("experts", [8, 64])
def test_three_level_table(avg_bits: float, experts: int) -> None:
    counts = level_counts(avg_bits, (3, 2, 1), experts)
    assert (counts[1], counts[2], counts[3]) == TABLE[avg_bits][experts]


@pytest.mark.parametrize("experts", [4, 8, 16, 60, 64, 128])
@pytest.mark.parametrize("levels", [(3, 2, 1), (4, 3, 2), (6, 4, 2)])
def test_three_level_counts_meet_the_two_level_average(experts: int, levels) -> None:
    for step in range(0, 41):
        avg = levels[2] + (levels[0] - levels[2]) * step / 40
        counts = level_counts(avg, levels, experts)
        assert sum(counts.values()) == experts and min(counts.values()) >= 0
        # Moves keep the average of the two-level split they start from.
        pair = (levels[0], levels[1]) if avg >= levels[1] else (levels[1], levels[2])
        start = two_level_counts(avg, *pair, experts)
        assert sum(b * n for b, n in counts.items()) == sum(b * n for b, n in start.items())


def test_two_level_kappa_uses_half_to_even_rounding() -> None:
    assert two_level_counts(2.5, 3, 2, 5) == {3: 2, 2: 3}  # κE = 2.5 -> 2
    assert two_level_counts(2.7, 3, 2, 5) == {3: 4, 2: 1}  # κE = 3.5 -> 4
    assert level_counts(3.0, (3, 2), 8) == {3: 8, 2: 0}
    assert level_counts(2.0, (3, 2), 8) == {3: 0, 2: 8}


@pytest.mark.parametrize(
    ("avg", "levels", "experts", "message"),
    [
        (2.0, (4, 2, 1), 8, "equally spaced"),
        (3.5, (3, 2, 1), 8, "outside the levels"),
        (0.5, (3, 2, 1), 8, "outside the levels"),
        (2.0, (3, 2, 1), 2, "need at least 3 experts"),
        (2.0, (3, 3, 1), 8, "distinct"),
        (2.0, (9, 1), 8, "from 1 to 8"),
        (2.5, (4, 3, 2, 1), 8, "two or three levels"),
    ],
)
def test_bad_inputs_are_named(avg, levels, experts, message) -> None:
    with pytest.raises(CountError, match=message):
        level_counts(avg, levels, experts)
