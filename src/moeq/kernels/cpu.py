"""CPU backend: per-expert grouped matmuls on weights unpacked just in time, one expert at a time.

Only experts that received tokens are touched, and the one dense weight alive at a time lives in a
buffer reused across experts and projections, so memory stays at packed size + one projection's
dense weight and unpack temporaries. Unpacking (:func:`moeq.quant.pack.unpack_codes`) is the cost
that matters on CPU.
"""

from __future__ import annotations

import torch

from ..quant.pack import unpack_codes
from ..quant.schemes import Scheme, decode
from .routing import group_by_expert

__all__ = ["experts_forward_cpu"]


def _dequantize_into(linear, out: torch.Tensor) -> torch.Tensor:
    """``linear``'s dense weight written into ``out`` (``[out_features, in_features]``, reused)."""
    rows, cols = linear.out_features, linear.in_features
    codes = unpack_codes(linear.codes, linear.spec.bits, rows * cols).view(rows, -1, linear.group_size)
    scheme = linear.spec.scheme
    if scheme is Scheme.LOG:
        out.copy_(decode(codes, linear.scales, None, scheme, linear.spec.bits).view(rows, cols))
        return out
    # The linear schemes are all (code - zero) * scale; sym and sign fold into a constant zero.
    scales = linear.scales.to(out.dtype).unsqueeze(-1)
    if scheme is Scheme.ASYM:
        zero = linear.zeros.to(out.dtype).unsqueeze(-1)
    elif scheme is Scheme.SYM:
        zero = float(1 << (linear.spec.bits - 1))
    else:  # SIGN: (2c - 1) s = (c - 1/2) 2s
        zero, scales = 0.5, scales * 2
    view = out.view(codes.shape)
    view.copy_(codes)
    view.sub_(zero).mul_(scales)
    return out


def _project(inputs: torch.Tensor, linear, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs @ W^T`` for ``linear``'s weight dequantized into ``buffer`` (grown if too small)."""
    size = linear.out_features * linear.in_features
    if buffer.numel() < size:
        buffer = torch.empty(size, dtype=inputs.dtype, device=inputs.device)
    weight = _dequantize_into(linear, buffer[:size].view(linear.out_features, linear.in_features))
    return inputs @ weight.T, buffer


def experts_forward_cpu(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, experts) -> torch.Tensor:
    """Same contract as :func:`moeq.kernels.moe_experts_forward` for a ``QuantizedExperts``."""
    groups = group_by_expert(top_k_index, top_k_weights, experts.num_experts)
    output = torch.zeros_like(hidden_states)
    buffer = hidden_states.new_empty(0)
    *first, down = experts.projections
    for expert, (start, count) in enumerate(zip(groups.starts.tolist(), groups.counts.tolist(), strict=True)):
        if count == 0:
            continue
        token = groups.token[start : start + count]
        x = hidden_states[token]
        linears = experts.expert(expert)
        if experts.gated:
            gate, buffer = _project(x, linears[first[0]], buffer)
            up, buffer = _project(x, linears[first[1]], buffer)
            h = experts.act_fn(gate) * up
        else:
            up, buffer = _project(x, linears[first[0]], buffer)
            h = experts.act_fn(up)
        y, buffer = _project(h, linears[down], buffer)
        output.index_add_(0, token, y * groups.weight[start : start + count, None].to(y.dtype))
    return output
