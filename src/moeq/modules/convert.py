"""Applying a BitPlan to a model: swap in quantized modules, empty (for loading) or filled (quantizing).

``prepare_model`` only builds the skeleton: the quantized modules with empty buffers of the right
sizes, as ``from_pretrained`` needs before it loads packed weights. ``quantize_model`` quantizes
each planned weight of a full-precision model and swaps the filled module in, one MoE layer at a
time, so only one layer's original and packed experts are alive together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models import MoEAdapter, MoELayer, moe_layers_or_error
from ..plan import BitPlan, PlanTarget, TensorSpec
from ..quant.tensor import QuantizedTensor
from .experts import QuantizedExperts, quantized_experts_for
from .linear import QuantizedLinear
from .recipe import quantize_weight

__all__ = ["copy_biases", "plan_target", "validate_plan", "prepare_model", "prepare_block", "quantize_model", "quantize_experts", "quantize_linear", "packed_linear", "rtn_quantizer"]

def rtn_quantizer(weight: torch.Tensor, spec: TensorSpec, scale_dtype: torch.dtype, name: str = "weight") -> QuantizedTensor:
    """``weight`` rounded by ``spec`` (the recipe's data-free method)."""
    return quantize_weight(weight, spec, scale_dtype, method="rtn", name=name)


def plan_target(model: nn.Module, found: tuple[MoEAdapter, list[MoELayer]] | None = None) -> PlanTarget:
    """What ``model`` (a meta skeleton is enough) offers a plan, for :meth:`BitPlan.from_json`
    (``found``: its adapter and MoE layers, when the caller has them already)."""
    adapter, layers = found or moe_layers_or_error(model)
    return PlanTarget(
        model_type=model.config.model_type,
        layers=tuple(layer.path for layer in layers),
        num_experts=tuple(layer.num_experts for layer in layers),
        projections=tuple(tuple(layer.projections) for layer in layers),
        linears=frozenset(adapter.linear_roles(model)),
    )


def validate_plan(model: nn.Module, plan: BitPlan) -> tuple[MoEAdapter, list[MoELayer]]:
    """Check that ``plan`` fits ``model``; errors name the mismatch."""
    adapter, layers = moe_layers_or_error(model)
    plan.check_fits(plan_target(model, (adapter, layers)))
    return adapter, layers


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _empty_linear(linear: nn.Linear, spec: TensorSpec, scale_dtype: torch.dtype) -> QuantizedLinear:
    return QuantizedLinear(
        linear.in_features, linear.out_features, spec, scale_dtype, bias=linear.bias is not None, dtype=linear.weight.dtype
    )


def prepare_model(model: nn.Module, plan: BitPlan) -> nn.Module:
    """Replace every planned module with an empty quantized one (for loading a saved model)."""
    adapter, layers = validate_plan(model, plan)
    _prepare(model, adapter, layers, plan, plan.linears)
    return model


def prepare_block(block: nn.Module, path: str, adapter: MoEAdapter, layers: list[MoELayer], plan: BitPlan) -> nn.Module:
    """:func:`prepare_model` for one block at module path ``path`` of the model.

    ``layers`` are the block's MoE layers with paths relative to the block and their global index
    (as ``adapter.moe_layers(block)`` gives them, re-indexed).
    """
    linears = {name[len(path) + 1 :]: spec for name, spec in plan.linears.items() if name.startswith(path + ".")}
    _prepare(block, adapter, layers, plan, linears)
    return block


def _prepare(root: nn.Module, adapter: MoEAdapter, layers: list[MoELayer], plan: BitPlan, linears: dict[str, TensorSpec]) -> None:
    scale_dtype = getattr(torch, plan.scale_dtype)
    for layer in layers:
        specs = plan.expert_specs(layer.index)
        if specs:
            _replace(root, layer.experts_path, quantized_experts_for(adapter, layer, specs, scale_dtype))
    for name, spec in linears.items():
        _replace(root, name, _empty_linear(root.get_submodule(name), spec, scale_dtype))


def quantize_experts(
    adapter: MoEAdapter, layer: MoELayer, specs: dict[tuple[int, str], TensorSpec], scale_dtype: torch.dtype,
) -> QuantizedExperts:
    """The packed experts of ``layer``, read one weight at a time through ``layer.expert_weight``."""
    quantized: QuantizedExperts = quantized_experts_for(adapter, layer, specs, scale_dtype)
    for (expert, projection), spec in specs.items():
        weight = layer.expert_weight(expert, projection)
        name = f"expert {expert} {projection} of {layer.experts_path}"
        quantized.expert(expert)[projection].load_quantized(rtn_quantizer(weight, spec, scale_dtype, name=name))
    copy_biases(quantized, layer)
    return quantized


@torch.no_grad()
def copy_biases(quantized: QuantizedExperts, layer: MoELayer) -> None:
    """Give ``quantized`` the full-precision biases of ``layer``'s experts (for experts that have them)."""
    if layer.expert_bias is None:
        return
    for expert in range(layer.num_experts):
        for projection in layer.projections:
            linear = quantized.expert(expert)[projection]
            linear.bias = nn.Parameter(layer.bias(expert, projection).detach().to(linear.bias.dtype).clone())


def quantize_linear(
    linear: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, spec: TensorSpec, scale_dtype: torch.dtype,
    name: str = "weight",
) -> QuantizedLinear:
    """The packed replacement of ``linear`` (its shape and dtype; ``weight``/``bias`` its values);
    ``name`` (its module path) is what errors call it."""
    return packed_linear(linear, rtn_quantizer(weight, spec, scale_dtype, name=name), bias, spec, scale_dtype)


def packed_linear(
    linear: nn.Module, packed: QuantizedTensor, bias: torch.Tensor | None, spec: TensorSpec, scale_dtype: torch.dtype
) -> QuantizedLinear:
    """The replacement of ``linear`` holding ``packed`` (already quantized by ``spec``) and ``bias``."""
    replacement = _empty_linear(linear, spec, scale_dtype)
    replacement.load_quantized(packed)
    if bias is not None:
        replacement.bias = nn.Parameter(bias.detach().clone())
    return replacement


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    plan: BitPlan,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Quantize every weight ``plan`` names, in place, and return ``model``."""
    adapter, layers = validate_plan(model, plan)
    scale_dtype = getattr(torch, plan.scale_dtype)
    for layer in layers:
        specs = plan.expert_specs(layer.index)
        if specs:
            _replace(model, layer.experts_path, quantize_experts(adapter, layer, specs, scale_dtype))
        if progress:
            progress(layer.path)
    for name, spec in plan.linears.items():
        linear = model.get_submodule(name)
        _replace(model, name, quantize_linear(linear, linear.weight, linear.bias, spec, scale_dtype, name))
        if progress:
            progress(name)
    return model
