"""The formats the biggest MoE checkpoints ship in, back to floats: read once, quantized by moeq.

- **FP8 with block scales** (DeepSeek-V3/R1, Kimi-K2, Qwen3 "-FP8"; transformers'
  ``FineGrainedFP8Config``): a weight ``[out, in]`` in ``float8_e4m3fn`` beside ``weight_scale_inv``
  ``[ceil(out/b0), ceil(in/b1)]`` float32, one scale per ``b0 x b1`` block (``weight_block_size``,
  128 x 128 in all of them); ``w = fp8 * scale`` in float32, as DeepSeek's own ``weight_dequant``
  computes it, blocks at the edges cut to the weight.
- **MXFP4** (OCP microscaling, gpt-oss's experts): ``*_blocks`` uint8 ``[..., G, 16]``, each byte two
  E2M1 values (low nibble first), and ``*_scales`` uint8 ``[..., G]``, an E8M0 exponent (bias 127)
  per 32 values: ``w = e2m1 * 2^(scale - 127)``.
"""

from __future__ import annotations

import torch

__all__ = ["E2M1_VALUES", "dequantize_fp8_blocks", "dequantize_mxfp4"]

# The 16 values of a 4-bit E2M1 code (sign, two exponent bits, one mantissa bit).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.bfloat16, name: str = "weight") -> torch.Tensor:
    """``weight [out, in]`` (float8) times its block scales, computed in float32, returned in ``dtype``."""
    rows, cols = weight.shape[-2:]
    expected = (-(-rows // block[0]), -(-cols // block[1]))
    if weight.dim() != 2 or tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}: an FP8 weight {list(weight.shape)} with {block[0]}x{block[1]} blocks needs scales of shape "
                         f"{list(expected)}, got {list(scale_inv.shape)}; the checkpoint's weight_block_size does not match it")
    scale = scale_inv.to(torch.float32).repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.to(torch.float32) * scale).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 ``blocks [..., G, 16]`` (uint8) and ``scales [..., G]`` (uint8) as ``[..., G * 32]`` values."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not fit: "
                         "blocks are [..., G, 16] bytes with one scale per G")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.int64)
    values = torch.stack([table[codes & 0x0F], table[codes >> 4]], dim=-1).flatten(-2)  # low nibble first
    exponents = scales.to(torch.int32) - 127
    return torch.ldexp(values, exponents[..., None].to(torch.float32)).flatten(-2).to(dtype)
