"""Quantized tiny layers for backend tests: uniform or mixed widths, gated (Mixtral) or not (Switch)."""

from __future__ import annotations

import random
from functools import cache

import torch

from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.modules.convert import quantize_model
from moeq.plan import BitPlan, ExpertEntry, TensorSpec

# Every width the kernels must handle, with each scheme and a grouped variant.
WIDTHS = [
    TensorSpec(1, "sign"), TensorSpec(1, "asym"), TensorSpec(2, "sym"), TensorSpec(2, "asym"), TensorSpec(3, "asym", 16),
    TensorSpec(3, "log"), TensorSpec(4, "sym"), TensorSpec(4, "asym", 32), TensorSpec(5, "asym"), TensorSpec(6, "asym", 32),
    TensorSpec(7, "sym"), TensorSpec(8, "sym"), TensorSpec(4, "symx", 32),  # symx: signed scales (llama.cpp's Q4_0 rule)
]


def plan_of(model, choose) -> BitPlan:
    """A plan for the model's first MoE layer only, ``choose()`` giving each expert projection's spec."""
    _, layers = moe_layers_or_error(model)
    layer = layers[0]
    entries = [ExpertEntry(layer.index, e, p, choose()) for e in range(layer.num_experts) for p in layer.projections]
    return BitPlan(model.config.model_type, [l.path for l in layers], entries)


@cache
def quantized_experts(family: str, spec: TensorSpec | None = None, seed: int = 0):
    """Layer 0's QuantizedExperts of a tiny ``family`` model, at ``spec`` everywhere or mixed widths."""
    model = tiny_model(family)
    rng = random.Random(seed)
    plan = plan_of(model, (lambda: spec) if spec else (lambda: rng.choice(WIDTHS)))
    quantized = quantize_model(model, plan)
    _, layers = moe_layers_or_error(quantized)
    return quantized.get_submodule(layers[0].experts_path)


def routing(tokens: int, hidden: int, num_experts: int, k: int, seed: int = 0):
    """Random hidden states and top-k routing, with one sentinel id to exercise skipping."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)])
    index[0, -1] = num_experts
    weights = torch.rand(tokens, k, generator=g)
    return x, index, weights
