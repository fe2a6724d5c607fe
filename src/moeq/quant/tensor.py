"""QuantizedTensor: the one container every quantizer returns.

Fields (``out, in`` = the original 2-D shape, ``G = in / group_size`` groups per row):

- ``codes``: uint8 ``[ceil(out*in*bits/8)]``, the row-major codes packed as in :mod:`moeq.quant.pack`;
- ``scales``: ``[out, G]`` in ``scale_dtype`` (float16 unless asked otherwise);
- ``zeros``: uint8 ``[out, G]`` integer zero points for ``asym``, float16 minima for ``affine``, else ``None``;
- ``bits``, ``group_size``, ``scheme``, ``shape`` and ``dtype`` (of the original weight).

``nbytes`` is the true storage of everything held: packed codes plus scales plus zero points.
The metadata travels in the checkpoint's ``quantization_config`` (the BitPlan), not as tensors.

K-quant schemes (``q2_k`` ... ``q6_k``) hold codes and scales together as GGML blocks
(:mod:`moeq.quant.kquants`): ``codes`` is uint8 ``[out * in/256 * type_size]``, the bytes a GGUF
file holds for the weight, ``group_size`` is the super-block (256), ``scales`` and ``zeros`` are
``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pack import PackLayout, packed_nbytes, unpack_codes
from .kquants import SUPER_BLOCK, decode_k, unpack_k
from .schemes import Scheme, decode, kquant_of

__all__ = ["QuantizedTensor", "storage_nbytes"]


@dataclass(frozen=True)
class QuantizedTensor:
    """Packed low-bit weight with its scales; ``dequantize()`` rebuilds a dense approximation."""

    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    scheme: Scheme
    shape: tuple[int, int]
    dtype: torch.dtype
    layout: PackLayout = PackLayout.STREAM_LE

    @property
    def num_groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes + scales + zero points."""
        total = self.codes.numel() * self.codes.element_size()
        if self.scales is not None:
            total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    def unpacked_codes(self) -> torch.Tensor:
        """Codes as uint8 ``[out, G, group_size]``."""
        rows, cols = self.shape
        if self.scheme.is_kquant:
            codes, _ = unpack_k(self.codes.view(rows, -1), kquant_of(self.scheme))
            return codes.to(torch.uint8)
        codes = unpack_codes(self.codes, self.bits, rows * cols)
        return codes.view(rows, self.num_groups, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[out, in]`` weight in ``dtype`` (default: the original dtype)."""
        if self.scheme.is_kquant:
            kind = kquant_of(self.scheme)
            codes, params = unpack_k(self.codes.view(self.shape[0], -1), kind)
            values = decode_k(codes, params, kind)
        else:
            values = decode(self.unpacked_codes(), self.scales, self.zeros, self.scheme, self.bits)
        return values.reshape(self.shape).to(dtype or self.dtype)


def storage_nbytes(shape: tuple[int, int], bits: int, group_size: int, scheme: Scheme, scale_bytes: int = 2) -> int:
    """True bytes a QuantizedTensor of this shape and spec holds (codes + scales + zero points)."""
    rows, cols = shape
    if scheme.is_kquant:
        return rows * cols // SUPER_BLOCK * kquant_of(scheme).type_size
    groups = rows * (cols // group_size)
    zero_bytes = scheme.zero_dtype.itemsize if scheme.zero_dtype is not None else 0
    return packed_nbytes(rows * cols, bits) + groups * (scale_bytes + zero_bytes)
