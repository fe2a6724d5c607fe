"""Routing statistics from calibration text, counted with the model's own routers.

A forward pre-hook on every routed-experts module sees exactly what the router decided: the
hidden states and each token's selected experts and weights. Per MoE layer and expert it
accumulates the number of routed tokens, the sum of their routing weights and, on request, the
per-channel second moment of each projection's input (``Σ x²`` over the routed tokens, for the
gate/up input and for the down input computed with the original weights), which weights the
quantization error by what the expert really sees.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import moe_layers_or_error

__all__ = ["RoutingStats", "collect_routing", "tokenize_calibration"]


@dataclass
class RoutingStats:
    """Per (MoE layer, expert): routed tokens, routing weight sums, and optional input moments."""

    tokens: int  # tokens that passed through each MoE layer
    counts: torch.Tensor  # [layers, experts] int64
    weight_sums: torch.Tensor  # [layers, experts] float64
    input_sq_sums: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def frequency(self) -> torch.Tensor:
        """Share of tokens routed to each expert (sums to top-k over a layer's experts)."""
        return self.counts.to(torch.float64) / max(self.tokens, 1)

    @property
    def mean_weight(self) -> torch.Tensor:
        """Mean routing weight of each expert over the tokens routed to it (0 if none)."""
        return self.weight_sums / self.counts.clamp(min=1).to(torch.float64)

    def input_second_moment(self, layer: int, expert: int, projection: str) -> torch.Tensor | None:
        total = self.input_sq_sums.get((layer, expert, projection))
        count = int(self.counts[layer, expert])
        return None if total is None or count == 0 else total / count


def tokenize_calibration(model_folder: str | Path, text_file: str | Path, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Token ids ``[num_sequences, seq_len]`` from a plain text file, with the model's tokenizer."""
    from transformers import AutoTokenizer

    text_path = Path(text_file)
    if not text_path.is_file():
        raise FileNotFoundError(f"calibration text {text_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
    except (OSError, ValueError) as err:
        raise ValueError(f"{model_folder} has no usable tokenizer for the calibration text ({str(err).splitlines()[0]})") from None
    ids = tokenizer(text_path.read_text(errors="replace"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    usable = min(num_tokens, ids.numel()) // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"calibration text {text_path} gives {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[:usable].view(-1, seq_len)


@torch.no_grad()
def collect_routing(
    model: nn.Module, token_ids: torch.Tensor, batch_size: int = 8, input_moments: bool = False
) -> RoutingStats:
    """Run ``token_ids [sequences, length]`` through ``model`` and count each expert's routing."""
    adapter, layers = moe_layers_or_error(model)
    num_experts = max(layer.num_experts for layer in layers)
    counts = torch.zeros(len(layers), num_experts, dtype=torch.int64)
    weight_sums = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    moments: dict[tuple[int, int, str], torch.Tensor] = {}
    tokens_seen = [0] * len(layers)

    def hook_for(layer):
        def hook(module: nn.Module, args: tuple) -> None:
            hidden, index, weights = adapter.routing_of_call(layer, args)
            tokens_seen[layer.index] += hidden.shape[0]
            valid = index < layer.num_experts
            flat = index[valid]
            counts[layer.index] += torch.bincount(flat, minlength=layer.num_experts)[: layer.num_experts].cpu()
            weight_sums[layer.index].index_add_(0, flat.cpu(), weights[valid].detach().to(torch.float64).cpu())
            if input_moments:
                _accumulate_moments(layer, hidden, index, moments)

        return hook

    handles = [model.get_submodule(layer.experts_path).register_forward_pre_hook(hook_for(layer)) for layer in layers]
    try:
        for batch in token_ids.split(batch_size):
            if model.config.is_encoder_decoder:
                model(input_ids=batch, decoder_input_ids=batch)
            else:
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    if len(set(tokens_seen)) > 1:
        raise RuntimeError(f"MoE layers saw different token counts {tokens_seen}; routing hooks are inconsistent")
    return RoutingStats(tokens_seen[0], counts, weight_sums, moments)


def _accumulate_moments(layer, hidden: torch.Tensor, index: torch.Tensor, moments: dict) -> None:
    """Σ x² of each projection's input over the tokens routed to each expert (original weights)."""
    for expert in range(layer.num_experts):
        rows = (index == expert).any(dim=-1)
        if not rows.any():
            continue
        x = hidden[rows].to(torch.float32)
        for projection in layer.projections[:-1]:
            _add(moments, (layer.index, expert, projection), x.pow(2).sum(dim=0))
        weights = [layer.expert_weight(expert, p).to(torch.float32) for p in layer.projections[:-1]]
        h = layer.act_fn(x @ weights[0].T)
        if layer.gated:
            h = h * (x @ weights[1].T)
        _add(moments, (layer.index, expert, layer.projections[-1]), h.pow(2).sum(dim=0))


def _add(store: dict, key, value: torch.Tensor) -> None:
    store[key] = store[key] + value.cpu().double() if key in store else value.cpu().double()
