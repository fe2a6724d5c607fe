"""Routing statistics from calibration text, counted with the model's own routers.

:class:`RoutingStats` is what the allocation strategies read (frequency, mean routing weight,
input second moments); it is built from the one collector (:mod:`moeq.calibrate.collector`),
filled either by a whole-model pass (:func:`collect_routing`, for a model already in memory) or
layer by layer from a checkpoint (:func:`moeq.calibrate.runner.collect_routing_streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import MoELayer, moe_layers_or_error
from .collector import ExpertStatistics

__all__ = ["DEFAULT_CORPUS", "RoutingStats", "collect_routing", "is_default_corpus", "tokenize_calibration"]


@dataclass
class RoutingStats:
    """Per (MoE layer, expert): routed tokens and routing weight sums, and the collector behind them."""

    tokens: int  # tokens that passed through each MoE layer
    counts: torch.Tensor  # [layers, experts] int64
    weight_sums: torch.Tensor  # [layers, experts] float64
    statistics: ExpertStatistics
    last_projection: list[str]  # per layer: the projection whose input is stage "out"

    @classmethod
    def from_statistics(cls, statistics: ExpertStatistics, layers: list[MoELayer]) -> RoutingStats:
        num_experts = max(layer.num_experts for layer in layers)
        counts = torch.zeros(len(layers), num_experts, dtype=torch.int64)
        weight_sums = torch.zeros(len(layers), num_experts, dtype=torch.float64)
        for (layer, expert), count in statistics.counts.items():
            counts[layer, expert] = count
            weight_sums[layer, expert] = statistics.weight_sums[(layer, expert)]
        seen = {statistics.tokens.get(layer.index, 0) for layer in layers}
        if len(seen) > 1:
            raise RuntimeError(f"MoE layers saw different token counts {sorted(seen)}; routing hooks are inconsistent")
        return cls(seen.pop(), counts, weight_sums, statistics, [layer.projections[-1] for layer in layers])

    @property
    def frequency(self) -> torch.Tensor:
        """Share of tokens routed to each expert (sums to top-k over a layer's experts)."""
        return self.counts.to(torch.float64) / max(self.tokens, 1)

    @property
    def mean_weight(self) -> torch.Tensor:
        """Mean routing weight of each expert over the tokens routed to it (0 if none)."""
        return self.weight_sums / self.counts.clamp(min=1).to(torch.float64)

    def input_second_moment(self, layer: int, expert: int, projection: str) -> torch.Tensor | None:
        """Mean squared input per channel of one expert projection (None without moments or tokens)."""
        stage = "out" if projection == self.last_projection[layer] else "in"
        return self.statistics.second_moment(layer, expert, stage)


DEFAULT_CORPUS = "default"  # --calib default: the project's own calibration text, used only when asked for


def is_default_corpus(calibration: object) -> bool:
    """Whether ``calibration`` asks for moeq's own corpus (``"default"``) rather than naming a file."""
    return isinstance(calibration, (str, Path)) and str(calibration) == DEFAULT_CORPUS


def tokenize_calibration(model_folder: str | Path, text_file: str | Path, num_tokens: int, seq_len: int) -> torch.Tensor:
    """Token ids ``[num_sequences, seq_len]`` from a plain text file (or ``"default"``: moeq's
    corpus), with the model's tokenizer."""
    from transformers import AutoTokenizer

    if is_default_corpus(text_file):
        from ..files import DATA_DIR

        text_file = DATA_DIR / "calibration.txt"

    if num_tokens < 1 or seq_len < 1:
        raise ValueError(f"calibration needs at least one token and a sequence length of at least 1 (got {num_tokens} tokens, length {seq_len})")
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
    """Run ``token_ids [sequences, length]`` through a loaded ``model`` and count each expert's routing.

    With ``input_moments`` the per-channel second moments of every expert projection's input
    are collected too (diagonals only: every layer's statistics are alive at once here).
    """
    adapter, layers = moe_layers_or_error(model)
    statistics = ExpertStatistics("diagonal" if input_moments else None)
    stages = ("in", "out") if input_moments else ("in",)
    handles = [
        model.get_submodule(layer.experts_path).register_forward_pre_hook(statistics.hook(adapter, layer, stages))
        for layer in layers
    ]
    try:
        for batch in token_ids.split(batch_size):
            if model.config.is_encoder_decoder:
                model(input_ids=batch, decoder_input_ids=batch)
            else:
                model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return RoutingStats.from_statistics(statistics, layers)
