"""Kernel layout: one layer's experts re-packed at first use into flat tensors a single launch can read.

The checkpoint keeps the STREAM_LE bytes of :mod:`moeq.quant.pack`, where a 3-, 5-, 6- or 7-bit
code may straddle two bytes and a row may start mid-byte. A kernel wants every code of a row at a
fixed word and shift, so each weight row is re-packed into int32 words holding ``32 // bits``
codes each, code ``k`` of a row at word ``k // (32 // bits)``, bits ``(k % (32 // bits)) * bits``
upwards; rows are padded to whole words (3 bits: 10 codes in 30 of 32 bits, 6 % more than the
stream; 1, 2, 4, 8 bits: no overhead) and then to a multiple of ``WORD_ALIGN`` words, so every
row starts on a 16-byte boundary and the kernel can read it with vector loads (no overhead when
``in_features * bits`` is a multiple of 128, as at every Mixtral-8x7B shape). All entries of a
layer are concatenated in one ``words`` tensor, with per-entry metadata (``META`` columns):

- ``vec_offset`` (first word / ``WORD_ALIGN``), ``bits``, ``vecs_per_row`` (words per row /
  ``WORD_ALIGN``), ``group_size``, ``scale_offset`` (first element in ``scales``/``zeros``),
  ``scheme`` (0: linear ``(c - z) s``, 1: log). Offsets count 16-byte vectors so that the kernel,
  multiplying them by ``WORD_ALIGN``, knows their alignment (a hint on a loaded scalar is lost).

``scales`` and ``zeros`` are float16 ``[sum of out*G]``: sym folds into ``z = 2^(b-1)``, sign into
``z = 1/2`` with scale ``2s``, asym keeps its integer zero points (exact in float16). Gated layers
put the gate projections at entries ``0..E-1`` and up at ``E..2E-1`` so a fused gate/up launch reads
both; the down projections are a layout of their own.

Memory: the layout is a second copy of the packed experts (codes + 4 bytes per group) on the
kernel's device, built once per layer and device and dropped with the module; the checkpoint
buffers stay untouched so saving writes the original format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.pack import unpack_codes
from ..quant.schemes import Scheme

__all__ = ["META", "WORD_ALIGN", "KernelLayout", "build_layout", "scales_and_zeros"]

META = ("vec_offset", "bits", "vecs_per_row", "group_size", "scale_offset", "scheme")
WORD_ALIGN = 4  # words: rows start 16 bytes apart


@dataclass(frozen=True)
class KernelLayout:
    """Flat tensors of several ``[out, in]`` quantized weights that share ``out`` and ``in``."""

    words: torch.Tensor  # int32
    meta: torch.Tensor  # int32 [entries, len(META)]
    scales: torch.Tensor  # float16
    zeros: torch.Tensor  # float16
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.meta, self.scales, self.zeros))


def _row_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` uint8 codes as int32 ``[rows, words]`` (``32 // bits`` codes a word, padded to ``WORD_ALIGN``)."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per_word)
    words = -(-words // WORD_ALIGN) * WORD_ALIGN
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    packed = (padded.view(rows, -1, per_word) << shifts).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def scales_and_zeros(linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(scale, zero)`` per group with every linear scheme as ``(code - zero) * scale``.

    sym folds into ``zero = 2^(b-1)``; sign, ``(2c - 1) s``, into ``zero = 1/2`` with scale ``2s``.
    """
    scheme, bits = linear.spec.scheme, linear.spec.bits
    scales = linear.scales.float()
    if scheme is Scheme.ASYM:
        return scales, linear.zeros.float()
    if scheme is Scheme.SIGN:
        return scales * 2, torch.full_like(scales, 0.5)
    zero = float(1 << (bits - 1)) if scheme is Scheme.SYM else 0.0
    return scales, torch.full_like(scales, zero)


def build_layout(linears: list, device: torch.device | str) -> KernelLayout:
    """The kernel layout of ``linears`` (QuantizedLinear of one shape), on ``device``."""
    out_features, in_features = linears[0].out_features, linears[0].in_features
    words, scales, zeros, meta = [], [], [], []
    word_offset = scale_offset = 0
    for linear in linears:
        bits = linear.spec.bits
        codes = unpack_codes(linear.codes, bits, out_features * in_features).view(out_features, in_features)
        row_words = _row_words(codes, bits)
        s, z = (t.to(torch.float16) for t in scales_and_zeros(linear))
        meta.append([word_offset // WORD_ALIGN, bits, row_words.shape[1] // WORD_ALIGN, linear.group_size, scale_offset,
                     int(linear.spec.scheme is Scheme.LOG)])
        words.append(row_words.reshape(-1))
        scales.append(s.reshape(-1))
        zeros.append(z.reshape(-1))
        word_offset += row_words.numel()
        scale_offset += s.numel()
    if word_offset >= 1 << 31:
        raise ValueError("a layer's experts exceed 2^31 kernel words; the Triton backend indexes with int32")
    return KernelLayout(
        words=torch.cat(words).to(device),
        meta=torch.tensor(meta, dtype=torch.int32, device=device),
        scales=torch.cat(scales).to(device),
        zeros=torch.cat(zeros).to(device),
        out_features=out_features,
        in_features=in_features,
    )
