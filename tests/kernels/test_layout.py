"""The kernel layout: bit planes that reassemble into the checkpoint's codes, at the theory's size."""

from __future__ import annotations

import pytest
import torch

from moeq.kernels.layout import WORD_ALIGN, bit_planes, build_layout
from moeq.modules.linear import QuantizedLinear
from moeq.modules.convert import rtn_quantizer
from moeq.plan import TensorSpec
from moeq.quant.pack import unpack_codes


def quantized_linear(spec: TensorSpec, out_features: int, in_features: int, seed: int) -> QuantizedLinear:
    linear = QuantizedLinear(in_features, out_features, spec)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    linear.load_quantized(rtn_quantizer(weight, spec, torch.float16))
    return linear


def test_planes_are_the_binary_digits_of_the_width() -> None:
    assert bit_planes(8) == [(8, 0)]
    assert bit_planes(7) == [(4, 0), (2, 4), (1, 6)]
    assert bit_planes(3) == [(2, 0), (1, 2)]
    for bits in range(1, 9):
        planes = bit_planes(bits)
        assert sum(width for width, _ in planes) == bits
        covered = sorted(bit for width, shift in planes for bit in range(shift, shift + width))
        assert covered == list(range(bits)), "every bit of the code in exactly one plane"


@pytest.mark.parametrize("in_features", [256, 100])  # a multiple of 128 (no padding), and not
def test_planes_reassemble_the_codes_at_exact_size(in_features: int) -> None:
    out_features = 6
    linears = [quantized_linear(TensorSpec(bits, "asym"), out_features, in_features, bits) for bits in range(1, 9)]
    layout = build_layout(linears, "cpu")
    words = layout.words.long() & 0xFFFFFFFF
    for entry, linear in enumerate(linears):
        vec_offset, bits = int(layout.meta[entry, 0]), int(layout.meta[entry, 1])
        base = vec_offset * WORD_ALIGN
        code = torch.zeros(out_features, in_features, dtype=torch.long)
        for width, shift in bit_planes(bits):
            per_word = 32 // width
            row_words = -(-in_features * width // 128) * WORD_ALIGN  # as the kernel computes it
            plane = words[base : base + out_features * row_words].view(out_features, row_words)
            k = torch.arange(in_features)
            code |= ((plane[:, k // per_word] >> (k % per_word * width)) & ((1 << width) - 1)) << shift
            base += out_features * row_words
        expected = unpack_codes(linear.codes, bits, out_features * in_features).view(out_features, in_features)
        assert torch.equal(code, expected.long())
    if in_features % 128 == 0:  # no row padding: exactly `bits` bits a weight, 3, 5, 6 and 7 included
        assert layout.words.numel() * 32 == out_features * in_features * sum(range(1, 9))
