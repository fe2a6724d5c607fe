"""Torch reference for a quantized MoE layer's routed experts: the ground truth other backends match.

Tokens are grouped by expert with one stable sort; only experts that received tokens are
dequantized, one at a time, so the dense copy alive at any moment is one expert's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["experts_forward_reference", "expert_hidden", "project"]


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ b)``: one dense projection of an expert (its bias, where it has one, in ``x``'s dtype)."""
    y = x @ weight.T
    return y if bias is None else y + bias.to(y.dtype)


def expert_hidden(first: list[torch.Tensor], act_fn: Callable[[torch.Tensor], torch.Tensor], gated: bool) -> torch.Tensor:
    """An expert's hidden activation from its first projections' outputs: ``act(gate x) * (up x)``
    when gated (SwiGLU-style), else ``act(up x)``; an ``act_fn`` with a ``combine(gate, up)`` (a
    model's own gate function) combines the two itself. Every path computes the products its own
    way (plain, packed, int4) and combines them here."""
    if not gated:
        return act_fn(first[0])
    combine = getattr(act_fn, "combine", None)
    return combine(first[0], first[1]) if combine is not None else act_fn(first[0]) * first[1]


def experts_forward_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_weights: Callable[[int, torch.dtype], list[torch.Tensor]],
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    expert_biases: Callable[[int, torch.dtype], list[torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """Weighted sum over each token's selected experts.

    Args:
        hidden_states: ``[tokens, hidden]``.
        top_k_index: ``[tokens, k]`` expert ids; an id ``>= num_experts`` is a sentinel and skipped.
        top_k_weights: ``[tokens, k]`` routing weights.
        expert_weights: ``(expert, dtype) -> [gate, up, down]`` (gated) or ``[up, down]``, each a
            dense ``[out, in]`` weight.
        act_fn: the activation (of the gate for gated experts).
        gated: SwiGLU-style ``down(act(gate x) * up x)`` versus ``down(act(up x))``.
        expert_biases: ``(expert, dtype) ->`` one bias (or None) per projection, for experts with biases.
    """
    tokens, k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1)
    flat_token = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)
    flat_weight = top_k_weights.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts + 1).tolist()
    output = torch.zeros_like(hidden_states)
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count == 0:
            continue
        rows = order[start : start + count]
        start += count
        token = flat_token[rows]
        x = hidden_states[token]
        *first, down = expert_weights(expert, x.dtype)
        *first_bias, down_bias = expert_biases(expert, x.dtype) if expert_biases is not None else [None] * (len(first) + 1)
        h = expert_hidden([project(x, w, b) for w, b in zip(first, first_bias, strict=True)], act_fn, gated)
        y = project(h, down, down_bias) * flat_weight[rows, None].to(h.dtype)
        output.index_add_(0, token, y.to(output.dtype))
    return output
