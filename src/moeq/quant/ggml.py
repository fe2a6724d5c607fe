"""GGML block formats (the tensor types of GGUF files) that moeq's codes map onto exactly.

A GGML type stores a row in blocks of ``block_size`` weights, each block ``type_size`` bytes,
rows one after another. Three types hold moeq's symmetric codes (``sym`` or ``symx``, whose
scales may be negative, as llama.cpp's own Q4_0/Q5_0 are) with groups of 32 bit for bit,
so export copies codes and scales instead of quantizing again:

=======  ==============================  ===========================================================
type     moeq spec                        block of 32 weights (``d`` = the group's float16 scale)
=======  ==============================  ===========================================================
Q4_0     ``sym``, 4 bits, group 32        ``d``, then 16 bytes: byte j = code j | code (j+16) << 4
Q5_0     ``sym``, 5 bits, group 32        ``d``, 4 bytes whose bit j is bit 4 of code j (little
                                          endian), then the low 4 bits of the codes as in Q4_0
Q8_0     ``sym``, 8 bits, group 32        ``d``, then 32 signed bytes, code - 128
Q1_0     ``sign``, 1 bit, group 128       ``d``, then 16 bytes: bit j of byte i = code 8i + j
Q4_1     ``affine``, 4 bits, group 32     ``d``, ``m`` (the group's float16 minimum), then as Q4_0
Q5_1     ``affine``, 5 bits, group 32     ``d``, ``m``, then as Q5_0
=======  ==============================  ===========================================================

Each decodes ``(code - 2^(b-1)) * d``, which is moeq's ``sym`` decode, in the same float32 product;
Q1_0 decodes ``d`` or ``-d``, which is ``sign``'s ``(2c - 1) d`` (its ``d`` is the group's mean |w|);
Q4_1 and Q5_1 decode ``code * d + m``, which is ``affine``'s.
moeq's K-quant schemes (``q2_k`` ... ``q6_k``, :mod:`moeq.quant.kquants`) are stored as the GGML
blocks themselves: their bytes are copied as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schemes import Scheme
from .tensor import QuantizedTensor

__all__ = ["GGMLType", "GGML_TYPES", "EXACT_TYPES", "exact_type", "ggml_blocks", "float_rows"]


@dataclass(frozen=True)
class GGMLType:
    """A GGML tensor type: its name, id in the GGUF file, and block geometry."""

    name: str
    type_id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """Exact storage per weight, scales included."""
        return self.type_size * 8 / self.block_size

    def row_bytes(self, row_length: int) -> int:
        if row_length % self.block_size:
            raise ValueError(f"{self.name} stores rows in blocks of {self.block_size}; a row of {row_length} does not divide")
        return row_length // self.block_size * self.type_size


# The ids are the file format's (ggml.h's enum ggml_type); geometry as ggml-common.h defines it.
GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q1_0", 41, 128, 18),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q2_K", 10, 256, 84),
        GGMLType("Q3_K", 11, 256, 110),
        GGMLType("Q4_K", 12, 256, 144),
        GGMLType("Q5_K", 13, 256, 176),
        GGMLType("Q6_K", 14, 256, 210),
        GGMLType("BF16", 30, 1, 2),
    )
}

# moeq spec (scheme, bits, group size) -> the GGML type holding its codes exactly.
EXACT_TYPES: dict[tuple[Scheme, int, int], str] = {
    (Scheme.SYM, 4, 32): "Q4_0",
    (Scheme.SYM, 5, 32): "Q5_0",
    (Scheme.SYM, 8, 32): "Q8_0",
    (Scheme.SYMX, 4, 32): "Q4_0",
    (Scheme.SYMX, 5, 32): "Q5_0",
    (Scheme.SYMX, 8, 32): "Q8_0",
    (Scheme.SIGN, 1, 128): "Q1_0",
    (Scheme.AFFINE, 4, 32): "Q4_1",
    (Scheme.AFFINE, 5, 32): "Q5_1",
}


def exact_type(scheme: Scheme, bits: int, group_size: int) -> GGMLType | None:
    """The GGML type that holds these codes bit for bit, or ``None``."""
    scheme = Scheme(scheme)
    if scheme.is_kquant:
        return GGML_TYPES[scheme.value.upper()]
    name = EXACT_TYPES.get((scheme, bits, group_size))
    return GGML_TYPES[name] if name else None


def ggml_blocks(tensor: QuantizedTensor) -> tuple[GGMLType, np.ndarray]:
    """The GGML type of ``tensor`` and its blocks, uint8 ``[out, row_bytes]`` (no re-quantization)."""
    kind = exact_type(tensor.scheme, tensor.bits, tensor.group_size)
    if kind is None:
        raise ValueError(
            f"{tensor.bits}-bit {tensor.scheme.value} codes with groups of {tensor.group_size} have no exact GGML type; "
            f"exact ones: {', '.join(f'{s.value} {b}-bit group {g} ({n})' for (s, b, g), n in EXACT_TYPES.items())}"
        )
    rows, cols = tensor.shape
    if tensor.scheme.is_kquant:
        return kind, np.ascontiguousarray(tensor.codes.view(rows, -1).numpy())
    codes = tensor.unpacked_codes().numpy().reshape(rows * cols // kind.block_size, kind.block_size)
    scales = tensor.scales.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)
    if tensor.scheme is Scheme.AFFINE:  # d, then the minimum m
        scales = np.concatenate([scales, tensor.zeros.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)], axis=-1)
    if kind.name == "Q1_0":
        payload = np.packbits(codes.astype(np.uint8), axis=-1, bitorder="little")
    elif kind.name == "Q8_0":
        payload = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        low = codes & 0x0F
        payload = low[:, :16] | (low[:, 16:] << 4)
        if kind.name in ("Q5_0", "Q5_1"):
            high = np.packbits((codes >> 4) & 1, axis=-1, bitorder="little")  # bit j of the uint32 = bit 4 of code j
            payload = np.concatenate([high, payload], axis=-1)
    blocks = np.concatenate([scales, payload.astype(np.uint8)], axis=-1)
    assert blocks.shape[1] == kind.type_size
    return kind, np.ascontiguousarray(blocks.reshape(rows, kind.row_bytes(cols)))


def float_rows(weight: torch.Tensor, type_name: str = "F16") -> tuple[GGMLType, np.ndarray]:
    """A full-precision tensor as GGML ``F16``, ``BF16`` or ``F32`` (its numpy array, same shape)."""
    kind = GGML_TYPES[type_name]
    if type_name == "F32":
        return kind, weight.detach().to(torch.float32).contiguous().numpy()
    if type_name == "F16":
        return kind, weight.detach().to(torch.float16).contiguous().numpy()
    if type_name == "BF16":
        return kind, weight.detach().to(torch.bfloat16).contiguous().view(torch.uint16).numpy().view(np.uint8)
    raise ValueError(f"{type_name} is not a float GGML type; one of F32, F16, BF16")
