"""Routing bookkeeping shared by the CPU and Triton backends: one sort puts each expert's tokens together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertGroups", "group_by_expert"]


@dataclass(frozen=True)
class ExpertGroups:
    """The routed (token, expert) pairs sorted by expert; sentinel pairs (id >= experts) sort last, unused.

    ``token[i]``, ``weight[i]``: token and routing weight of sorted slot ``i``; expert ``e`` owns slots
    ``starts[e] : starts[e] + counts[e]``.
    """

    token: torch.Tensor
    weight: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def group_by_expert(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sort the ``[tokens, k]`` routing into per-expert runs (one stable sort, no host sync)."""
    tokens, k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1).clamp(max=num_experts)
    order = torch.argsort(flat_expert, stable=True)
    token = torch.arange(tokens, device=top_k_index.device).repeat_interleave(k)[order]
    counts = torch.bincount(flat_expert, minlength=num_experts + 1)[:num_experts]
    starts = torch.cumsum(counts, 0) - counts
    return ExpertGroups(token, top_k_weights.reshape(-1)[order], starts, counts)
