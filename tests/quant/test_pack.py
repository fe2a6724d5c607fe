"""Packing: exact sizes and bit-exact round trips for every width, checked by property tests."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeq.quant.pack import pack_codes, packed_nbytes, unpack_codes


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 3000), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_bit_exact_and_size_is_theory(bits: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.uint8))


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 17), cols=st.integers(1, 33))
def test_two_dimensional_codes_pack_row_major(bits: int, rows: int, cols: int) -> None:
    codes = torch.randint(0, 1 << bits, (rows, cols))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, pack_codes(codes.reshape(-1), bits))
    assert torch.equal(unpack_codes(packed, bits, rows * cols).view(rows, cols), codes.to(torch.uint8))


def test_worked_example_from_the_docstring() -> None:
    assert pack_codes(torch.tensor([5, 1, 6]), 3).tolist() == [0x8D, 0x01]


def test_extreme_codes_survive() -> None:
    for bits in range(1, 9):
        codes = torch.full((19,), (1 << bits) - 1)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 19), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_bad_width_is_refused(bits) -> None:
    with pytest.raises(ValueError, match="bit width"):
        pack_codes(torch.zeros(4, dtype=torch.int64), bits)


def test_out_of_range_codes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([8]), 3)


def test_wrong_buffer_size_is_refused() -> None:
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 3)


def _stream_by_hand(codes: list[int], bits: int) -> list[int]:
    """The STREAM_LE layout one bit at a time: code i's bit k is stream bit i * bits + k."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for k in range(bits):
            if code >> k & 1:
                position = i * bits + k
                out[position // 8] |= 1 << (position % 8)
    return out


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), codes=st.data())
def test_bytes_equal_the_stream_layout_bit_by_bit(bits: int, codes) -> None:
    # Pins the checkpoint format itself, not only pack/unpack consistency.
    values = codes.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70))
    assert pack_codes(torch.tensor(values, dtype=torch.int64), bits).tolist() == _stream_by_hand(values, bits)
