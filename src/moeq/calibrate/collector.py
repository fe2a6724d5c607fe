"""One collector of per-expert calibration statistics, for allocation and for GPTQ alike.

A forward pre-hook on a routed-experts module sees exactly what the router decided: the hidden
states and each token's selected experts and weights. Per (MoE layer, expert) the collector
accumulates the routed tokens, the sum of their routing weights and, on request, the second
moments of what each projection receives, either as full matrices ``Σ x xᵀ`` (GPTQ's Hessians)
or as their diagonals ``Σ x²`` (enough to weight a quantization error, and far smaller):

- stage ``"in"``: the gate/up (or ``wi``) input, the routed hidden states themselves;
- stage ``"out"``: the down (or ``wo``) input ``act(gate x) * up x``, computed with the weights
  ``weights_of(expert)`` gives (the original ones, or already quantized ones for GPTQ's
  sequential order).

The whole-model pass (:func:`moeq.calibrate.routing.collect_routing`) and the layer-by-layer
runner (:mod:`moeq.calibrate.runner`) both feed this class.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.reference import expert_hidden, project
from ..models import MoEAdapter, MoELayer
from .hessian import HessianSum

__all__ = ["ExpertStatistics", "MOMENTS"]

MOMENTS = (None, "diagonal", "full")


class ExpertStatistics:
    """Token counts, routing weights and input moments per (MoE layer, expert)."""

    def __init__(self, moments: str | None = None) -> None:
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
        self.moments = moments
        self.tokens: dict[int, int] = {}  # MoE layer -> tokens that reached it
        self.counts: dict[tuple[int, int], int] = {}
        self.weight_sums: dict[tuple[int, int], float] = {}
        self.hessians: dict[object, HessianSum] = {}  # (layer, expert, stage) or a linear's name
        self.diagonals: dict[tuple[int, int, str], torch.Tensor] = {}

    def add_moment(self, key, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        if self.moments == "diagonal":
            total = x.pow(2).sum(dim=0).double()
            self.diagonals[key] = self.diagonals[key] + total if key in self.diagonals else total
            return
        if key not in self.hessians:
            self.hessians[key] = HessianSum(x.shape[-1])
        self.hessians[key].add(x)

    def forget(self, key) -> None:
        self.hessians.pop(key, None)
        self.diagonals.pop(key, None)

    def second_moment(self, layer: int, expert: int, stage: str) -> torch.Tensor | None:
        """Mean ``x²`` per input channel over the rows the expert saw at ``stage`` (None if none)."""
        key = (layer, expert, stage)
        if key in self.diagonals:
            rows = self.counts.get((layer, expert), 0)
            return None if rows == 0 else self.diagonals[key] / rows
        if key in self.hessians and self.hessians[key].rows:
            return torch.diag(self.hessians[key].matrix).double() / self.hessians[key].rows
        return None

    def hook(
        self,
        adapter: MoEAdapter,
        layer: MoELayer,
        stages: tuple[str, ...] = ("in",),
        only: set[int] | None = None,
        weights_of: Callable[[int], list[torch.Tensor]] | None = None,
    ):
        """A forward pre-hook for ``layer``'s experts module.

        ``only``: feed every token to these experts instead of the routed ones (statistics only;
        counts are not touched). ``weights_of``: the gate/up weights for stage ``"out"``
        (default: the layer's own).
        """

        def original(expert: int) -> list[torch.Tensor]:
            return [layer.expert_weight(expert, p).to(torch.float32) for p in layer.projections[:-1]]

        upstream = weights_of or original

        def hook(module, args) -> None:
            hidden, index, weights = adapter.routing_of_call(layer, args)
            if "in" in stages and only is None:
                self.tokens[layer.index] = self.tokens.get(layer.index, 0) + hidden.shape[0]
            for expert in range(layer.num_experts):
                if only is not None:
                    if expert not in only:
                        continue
                    rows = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
                else:
                    hit = index == expert
                    rows = hit.any(dim=-1)
                    if "in" in stages:
                        key = (layer.index, expert)
                        self.counts[key] = self.counts.get(key, 0) + int(rows.sum())
                        self.weight_sums[key] = self.weight_sums.get(key, 0.0) + float(weights[hit].double().sum())
                if self.moments is None or not rows.any():
                    continue
                x = hidden[rows].to(torch.float32)
                if "in" in stages:
                    self.add_moment((layer.index, expert, "in"), x)
                if "out" in stages:
                    first = zip(upstream(expert), layer.projections[:-1], strict=True)
                    h = expert_hidden([project(x, w, layer.bias(expert, p)) for w, p in first], layer.act_fn, layer.gated)
                    self.add_moment((layer.index, expert, "out"), h)

        return hook
