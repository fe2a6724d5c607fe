"""Dense bit packing of integer codes of any width from 1 to 8 bits.

Layout (``PackLayout.STREAM_LE``): the codes, flattened in row-major order, form one little-endian
bit stream. Code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. ``n`` codes of ``b`` bits therefore cost
exactly ``ceil(n*b/8)`` bytes, with no padding per value or per row.

Worked example, b = 3, codes ``[5, 1, 6]`` (binary 101, 001, 110)::

    stream bits 0..8 (LSB of each code first): 1 0 1 | 1 0 0 | 0 1 1
    byte 0 = stream bits 0..7 = 0b10001101 = 0x8D, byte 1 = stream bit 8 = 0x01
    -> 2 bytes = ceil(3 * 3 / 8)

Why this way: eight codes of ``b`` bits fill exactly ``b`` bytes, so packing reshapes the codes into
groups of eight, assembles each group into one 64-bit integer with shifts, and splits it into
``b`` bytes; unpacking runs the same steps backwards (widths that divide 8 take a shortcut: one
shift of the bytes). Every step is a vectorised tensor op, with no Python loop over values.
A kernel that prefers another arrangement (issue 6) re-arranges at load time; this stream is
the checkpoint format.
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = ["PackLayout", "pack_codes", "unpack_codes", "packed_nbytes"]


class PackLayout(str, Enum):
    """How packed codes are laid out in their byte buffer."""

    STREAM_LE = "stream_le"


def packed_nbytes(num_codes: int, bits: int) -> int:
    """Bytes needed for ``num_codes`` codes of ``bits`` bits: ``ceil(num_codes * bits / 8)``."""
    _check_bits(bits)
    return (num_codes * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an integer from 1 to 8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a 1-D uint8 tensor of ``ceil(n*bits/8)`` bytes.

    ``codes`` may have any shape and integer dtype; it is flattened in row-major order.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    # Eight codes fill ``bits`` bytes; code j of a group starts at bit j * bits and touches at most
    # two bytes, so each position is ORed into its byte(s) with uint8 shifts (the high bits of a
    # left shift fall off, which is what the stream wants).
    groups = (n + 7) // 8
    padded = torch.zeros(groups * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    codes = padded.view(groups, 8)
    group_bytes = torch.zeros(groups, bits, dtype=torch.uint8, device=flat.device)
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        group_bytes[:, byte] |= codes[:, j] << shift
        if shift + bits > 8:
            group_bytes[:, byte + 1] |= codes[:, j] >> (8 - shift)
    return group_bytes.reshape(-1)[: packed_nbytes(n, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``num_codes`` codes as a 1-D uint8 tensor.

    For 8 bits the result is a view of ``packed`` (no copy); treat it as read-only.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_nbytes(num_codes, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"{num_codes} codes of {bits} bits need {expected} bytes, the buffer holds {packed.numel()}"
        )
    if bits == 8:
        return packed[:num_codes]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        # 1, 2, 4 bits: whole codes sit inside one byte, LSB first; one shifted copy of the bytes per
        # code position, interleaved by a stack (contiguous ops: 2-4x faster than a broadcast shift).
        positions = [(packed >> shift) & mask for shift in range(0, 8, bits)]
        return torch.stack(positions, dim=1).reshape(-1)[:num_codes]
    # 3, 5, 6, 7 bits: eight codes fill ``bits`` bytes; code j of a group starts at bit j * bits and
    # spans at most two bytes, so each of the eight positions is one or two byte shifts, in uint8.
    groups = (num_codes + 7) // 8
    padded = packed.new_zeros(groups * bits)
    padded[: packed.numel()] = packed
    group_bytes = padded.view(groups, bits)
    positions = []
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        code = group_bytes[:, byte] >> shift
        if shift + bits > 8:
            code |= group_bytes[:, byte + 1] << (8 - shift)
        positions.append(code & mask)
    return torch.stack(positions, dim=1).reshape(-1)[:num_codes]
