"""CPU backends: per-expert grouped matmuls over the experts that received tokens.

- ``cpu`` (memory-lean): each weight is unpacked and dequantized just in time into one buffer
  reused across experts and projections, so memory stays at packed size + one projection's dense
  weight. Unpacking and dequantizing cost more than the product itself.
- ``cpu-int4`` (fast): projections of 1 to 4 bits with a linear scheme are re-packed at first use
  into torch's CPU int4 matmul layout (``_weight_int4pack_mm_for_cpu``, the tinygemm kernel) and
  kept on the module; the product then reads 4-bit codes directly. Every width is held as 4 bits
  there (a 2-bit expert costs 4 bits + scales in that copy), on top of the packed buffers the
  checkpoint needs. Projections the layout cannot take run as in ``cpu``, and so does an expert
  with more than ``INT4_MAX_ROWS`` tokens: the int4 kernel's time grows with the rows, while
  dequantizing once and multiplying in bf16 is cheaper beyond ~100 rows (measured crossover
  between 64 and 128 rows at 896x256 and 3584x1024, one thread).

The int4 layout: code ``c`` of width ``b`` becomes ``q = c + 8 - 2^(b-1)`` in ``[0, 16)``, and the
kernel's ``(q - 8) * scale + zero`` equals ``(c - z) * s`` with ``scale = s``, ``zero = (2^(b-1) - z) * s``
(sym, sign and asym all fold into a zero point ``z``, see :mod:`moeq.kernels.layout`). The
kernel takes groups of 32, 64, 128 or 256 inputs; a coarser moeq group (or a whole row) repeats
its scale over the kernel groups it spans. Scales and zeros are in the activations' dtype, so a
bf16 model rounds them to bf16 (the reference backend rounds the dequantized weight to bf16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..quant.pack import unpack_codes
from ..quant.schemes import Scheme, decode
from .layout import scales_and_zeros
from .reference import expert_hidden
from .routing import group_by_expert

__all__ = ["experts_forward_cpu", "int4_group"]

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel accepts, largest first
INT4_MAX_ROWS = 96  # beyond this many tokens per expert, dequantize + bf16 matmul is faster


def _dequantize_into(linear, out: torch.Tensor) -> torch.Tensor:
    """``linear``'s dense weight written into ``out`` (``[out_features, in_features]``, reused)."""
    rows, cols = linear.out_features, linear.in_features
    scheme = linear.spec.scheme
    if scheme.is_kquant:  # GGML blocks: their own decode (moeq.quant.kquants)
        out.copy_(linear.weight_for(out.dtype))
        return out
    codes = unpack_codes(linear.codes, linear.spec.bits, rows * cols).view(rows, -1, linear.group_size)
    if scheme in (Scheme.LOG, Scheme.AFFINE):
        out.copy_(decode(codes, linear.scales, linear.zeros, scheme, linear.spec.bits).view(rows, cols))
        return out
    scales, zeros = (t.to(out.dtype).unsqueeze(-1) for t in scales_and_zeros(linear))
    view = out.view(codes.shape)
    view.copy_(codes)
    view.sub_(zeros).mul_(scales)
    return out


class _JustInTime:
    """``inputs @ W^T`` with ``W`` dequantized into one reused buffer per call."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def __call__(self, inputs: torch.Tensor, linear) -> torch.Tensor:
        size = linear.out_features * linear.in_features
        if self.buffer.numel() < size or self.buffer.dtype != inputs.dtype:
            self.buffer = torch.empty(size, dtype=inputs.dtype, device=inputs.device)
        weight = _dequantize_into(linear, self.buffer[:size].view(linear.out_features, linear.in_features))
        return inputs @ weight.T


def int4_group(linear) -> int | None:
    """The CPU int4 kernel's group size for ``linear``, or None when the layout cannot hold it."""
    scheme = linear.spec.scheme
    if linear.spec.bits > 4 or scheme in (Scheme.LOG, Scheme.AFFINE) or scheme.is_kquant or linear.out_features % 16:
        return None
    return next((g for g in INT4_GROUPS if linear.group_size % g == 0 and linear.in_features % g == 0), None)


@dataclass(frozen=True)
class _Int4Weight:
    packed: torch.Tensor  # uint8, torch's CPU int4 layout
    scale_zero: torch.Tensor  # [in / group, out, 2] in the activations' dtype
    group: int
    source: int  # data_ptr of the codes it was built from

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_zero))


def _int4_weight(linear, dtype: torch.dtype) -> _Int4Weight:
    rows, cols, bits = linear.out_features, linear.in_features, linear.spec.bits
    group = int4_group(linear)
    codes = unpack_codes(linear.codes, bits, rows * cols).view(rows, cols)
    q = codes.to(torch.int32) + (8 - (1 << (bits - 1)))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales, zeros = (t.float().view(rows, -1) for t in scales_and_zeros(linear))
    offset = ((1 << (bits - 1)) - zeros) * scales
    repeat = linear.group_size // group
    scale_zero = torch.stack([scales, offset], -1).repeat_interleave(repeat, dim=1).transpose(0, 1)
    return _Int4Weight(packed, scale_zero.to(dtype).contiguous(), group, linear.codes.data_ptr())


class _Int4:
    """``inputs @ W^T`` through torch's CPU int4 kernel, layouts cached on the experts module."""

    def __init__(self, experts) -> None:
        if not hasattr(experts, "_int4_weights"):
            experts._int4_weights = {}
        self.cache: dict = experts._int4_weights
        self.fallback = _JustInTime()

    def __call__(self, inputs: torch.Tensor, linear) -> torch.Tensor:
        if inputs.shape[0] > INT4_MAX_ROWS or int4_group(linear) is None:
            return self.fallback(inputs, linear)
        key = (id(linear), inputs.dtype)
        weight = self.cache.get(key)
        if weight is None or weight.source != linear.codes.data_ptr():
            weight = self.cache[key] = _int4_weight(linear, inputs.dtype)
        flat = inputs.reshape(-1, inputs.shape[-1]).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weight.packed, weight.group, weight.scale_zero)


def _biased(y: torch.Tensor, linear) -> torch.Tensor:
    return y if linear.bias is None else y + linear.bias.to(y.dtype)


def experts_forward_cpu(
    hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts, int4: bool = False
) -> torch.Tensor:
    """Same contract as :func:`moeq.kernels.moe_experts_forward` for a ``QuantizedExperts``;
    ``int4`` selects the ``cpu-int4`` backend."""
    project: Callable[[torch.Tensor, object], torch.Tensor] = _Int4(experts) if int4 else _JustInTime()
    groups = group_by_expert(top_k_index, top_k_weights, experts.num_experts)
    output = torch.zeros_like(hidden_states)
    *first, down = experts.projections
    for expert, (start, count) in enumerate(zip(groups.starts.tolist(), groups.counts.tolist(), strict=True)):
        if count == 0:
            continue
        token = groups.token[start : start + count]
        x = hidden_states[token]
        linears = experts.expert(expert)
        h = expert_hidden([_biased(project(x, linears[name]), linears[name]) for name in first], experts.act_fn, experts.gated)
        y = _biased(project(h, linears[down]), linears[down])
        output.index_add_(0, token, y * groups.weight[start : start + count, None].to(y.dtype))
    return output
