"""Kernel layout: one layer's experts re-packed at first use into flat tensors a single launch can read.

The checkpoint keeps the STREAM_LE bytes of :mod:`moeq.quant.pack`, where a 3-, 5-, 6- or 7-bit
code may straddle two bytes and a row may start mid-byte. A kernel wants each tile of codes at
fixed words and shifts whatever the width, so a ``b``-bit weight is split into **bit planes** of
power-of-two widths: ``8`` for 8 bits, else the binary digits of ``b`` (7 = 4 + 2 + 1, 6 = 4 + 2,
5 = 4 + 1, 3 = 2 + 1). A code is ``p4 | p2 << (b & 4) | p1 << (b & 6)`` (``p8`` alone at 8 bits).
Each plane of width ``p`` stores every row as int32 words of ``32 // p`` codes, code ``k`` at word
``k // (32 // p)``, bits ``(k % (32 // p)) * p`` upwards, and pads each row to a multiple of
``WORD_ALIGN`` words (16 bytes), so the kernel reads a tile of any plane with vector loads. Sizes
are exact: ``b`` bits a weight at every width, plus the row padding (none when ``in_features`` is
a multiple of 128, as at every Mixtral-8x7B shape).

Because every plane has a power-of-two width, the kernel loads the same four plane tiles (those an
entry lacks are masked off) at every width, with no branch around a load: that is what lets Triton
software-pipeline the loop (asynchronous copies several tiles ahead), which a load inside a
width branch prevents. Words per row of plane ``p`` follow from ``in_features`` alone
(``ceil(in * p / 128)`` 16-byte vectors), so the kernel computes them. An entry's planes lie one
after another, widest first; all entries of a layer are concatenated in one ``words`` tensor, with
per-entry metadata (``META`` columns):

- ``vec_offset`` (first word / ``WORD_ALIGN``: counting 16-byte vectors lets the kernel, which
  multiplies it back, know its alignment; a hint on a loaded scalar is lost), ``bits``,
  ``group_size``, ``scale_offset`` (first element in ``scales``/``zeros``), ``scheme`` (0: linear
  ``(c - z) s``, 1: log).

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

__all__ = ["META", "WORD_ALIGN", "KernelLayout", "bit_planes", "build_layout", "scales_and_zeros"]

META = ("vec_offset", "bits", "group_size", "scale_offset", "scheme")
WORD_ALIGN = 4  # words: rows start 16 bytes apart


def bit_planes(bits: int) -> list[tuple[int, int]]:
    """``(plane width, shift within the code)`` of a ``bits``-wide code, widest plane first."""
    if bits == 8:
        return [(8, 0)]
    shifts = {4: 0, 2: bits & 4, 1: bits & 6}
    return [(p, shifts[p]) for p in (4, 2, 1) if bits & p]


@dataclass(frozen=True)
class KernelLayout:
    """Flat tensors of several ``[out, in]`` quantized weights that share ``out`` and ``in``."""

    words: torch.Tensor  # int32
    meta: torch.Tensor  # int32 [entries, len(META)]
    scales: torch.Tensor  # float16
    zeros: torch.Tensor  # float16
    out_features: int
    in_features: int
    group_sizes: tuple[int, ...]  # per entry, on the host: launches choose their scaling without a sync

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.meta, self.scales, self.zeros))

    def one_scale_per_tile(self, block_k: int) -> bool:
        """Whether one scale covers every ``block_k`` run of a row, in every entry (groups that are
        multiples of ``block_k``, or whole rows): then the kernel scales after the product."""
        return all(g % block_k == 0 or g == self.in_features for g in self.group_sizes)


def _row_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` codes of a power-of-two width as int32 ``[rows, words]`` (``32 // bits`` codes
    a word), each row padded to a multiple of ``WORD_ALIGN`` words."""
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
    if scheme is Scheme.AFFINE:  # c s + m: folding m into a float16 zero point would round it
        raise ValueError("affine codes carry float minima, not zero points; decode them with moeq.quant.schemes.decode")
    scales = linear.scales.float()
    if scheme is Scheme.ASYM:
        return scales, linear.zeros.float()
    if scheme is Scheme.SIGN:
        return scales * 2, torch.full_like(scales, 0.5)
    zero = float(1 << (bits - 1)) if scheme in (Scheme.SYM, Scheme.SYMX) else 0.0
    return scales, torch.full_like(scales, zero)


def build_layout(linears: list, device: torch.device | str) -> KernelLayout:
    """The kernel layout of ``linears`` (QuantizedLinear of one shape), on ``device``."""
    out_features, in_features = linears[0].out_features, linears[0].in_features
    words, scales, zeros, meta = [], [], [], []
    word_offset = scale_offset = 0
    for linear in linears:
        bits = linear.spec.bits
        codes = unpack_codes(linear.codes, bits, out_features * in_features).view(out_features, in_features).long()
        planes = [_row_words((codes >> shift) & ((1 << width) - 1), width).reshape(-1) for width, shift in bit_planes(bits)]
        s, z = (t.to(torch.float16) for t in scales_and_zeros(linear))
        meta.append([word_offset // WORD_ALIGN, bits, linear.group_size, scale_offset, int(linear.spec.scheme is Scheme.LOG)])
        words.extend(planes)
        scales.append(s.reshape(-1))
        zeros.append(z.reshape(-1))
        word_offset += sum(plane.numel() for plane in planes)
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
        group_sizes=tuple(linear.group_size for linear in linears),
    )
