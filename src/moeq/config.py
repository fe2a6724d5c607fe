"""QuantConfig: the one-line way to ask for a uniform plan, and the plan it turns into."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import LinearRole, moe_layers_or_error
from .plan import BitPlan, ExpertEntry, PlanError, TensorSpec
from .quant.rtn import resolve_group_size
from .quant.schemes import Scheme
from .quant.tensor import storage_nbytes

__all__ = ["QuantConfig", "FULL_PRECISION_BITS", "linear_specs", "uniform_plan", "plan_budget"]

FULL_PRECISION_BITS = 16


@dataclass(frozen=True)
class QuantConfig:
    """Uniform widths: routed experts at ``bits`` (16 = left in full precision); other linears
    by role at their own width, or full precision when ``None`` (MoQE: experts only).

    ``scheme``/``group_size``/``clip_search`` apply to every quantized weight; a ``sign`` scheme
    applies to 1-bit weights, and other widths then use ``asym``.
    """

    bits: int = 4
    scheme: str = "asym"
    group_size: int | None = None
    clip_search: bool = False
    attn_bits: int | None = None
    shared_bits: int | None = None
    dense_bits: int | None = None
    lm_head_bits: int | None = None
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_bits("--bits", self.bits)
        for role, bits in self.role_bits().items():
            _check_bits(f"{role} bits", bits)
        for bits in {self.bits, *self.role_bits().values()} - {None, FULL_PRECISION_BITS}:
            self.spec(bits)  # validates scheme and width together

    def spec(self, bits: int) -> TensorSpec:
        scheme = self.scheme
        if scheme == Scheme.SIGN.value and bits != 1:
            scheme = Scheme.ASYM.value
        return TensorSpec(bits=bits, scheme=scheme, group_size=self.group_size, clip_search=self.clip_search)

    def role_bits(self) -> dict[str, int | None]:
        return {
            LinearRole.ATTENTION: self.attn_bits,
            LinearRole.SHARED: self.shared_bits,
            LinearRole.DENSE: self.dense_bits,
            LinearRole.LM_HEAD: self.lm_head_bits,
        }


def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and bits != FULL_PRECISION_BITS and not (isinstance(bits, int) and 1 <= bits <= 8):
        raise PlanError(f"{name} must be 1 to 8 (or {FULL_PRECISION_BITS} for full precision), got {bits!r}")


def uniform_plan(model: nn.Module, config: QuantConfig) -> BitPlan:
    """The plan that gives every routed expert ``config.bits`` and other linears their role's width."""
    adapter, layers = moe_layers_or_error(model)
    experts = []
    if config.bits != FULL_PRECISION_BITS:
        spec = config.spec(config.bits)
        for layer in layers:
            for _, inputs in layer.shapes.values():
                resolve_group_size(inputs, spec.group_size, spec.scheme)
            experts += [ExpertEntry(layer.index, e, p, spec) for e in range(layer.num_experts) for p in layer.projections]
    linears = linear_specs(model, config)
    plan = BitPlan(
        model_type=model.config.model_type,
        layers=[layer.path for layer in layers],
        experts=experts,
        linears=linears,
        scale_dtype=config.scale_dtype,
        method={"strategy": "uniform", "config": {k: v for k, v in vars(config).items()}},
    )
    plan.budget = plan_budget(model, plan)
    return plan


def linear_specs(model: nn.Module, config: QuantConfig) -> dict[str, TensorSpec]:
    """Specs for the linears outside the routed experts that ``config`` asks to quantize, by role."""
    adapter, _ = moe_layers_or_error(model)
    role_bits = config.role_bits()
    return {
        name: config.spec(role_bits[role])
        for name, role in adapter.linear_roles(model).items()
        if role_bits.get(role) not in (None, FULL_PRECISION_BITS)
    }


def plan_budget(model: nn.Module, plan: BitPlan) -> dict[str, float | int]:
    """Mean expert bits (parameter-weighted) and the true bytes of the experts and of the model."""
    _, layers = moe_layers_or_error(model)
    scale_bytes = torch.empty(0, dtype=getattr(torch, plan.scale_dtype)).element_size()
    expert_params = 0
    expert_bits_sum = 0.0
    expert_bytes = expert_fp_bytes = 0
    for layer in layers:
        specs = plan.expert_specs(layer.index)
        element = torch.empty(0, dtype=layer.dtype).element_size()
        for e in range(layer.num_experts):
            for p, shape in layer.shapes.items():
                numel = shape[0] * shape[1]
                expert_params += numel
                expert_fp_bytes += numel * element
                spec = specs.get((e, p))
                if spec is None:
                    expert_bytes += numel * element
                    expert_bits_sum += numel * FULL_PRECISION_BITS
                    continue
                group = resolve_group_size(shape[1], spec.group_size, spec.scheme)
                expert_bytes += storage_nbytes(shape, spec.bits, group, spec.scheme, scale_bytes)
                expert_bits_sum += numel * spec.bits
    linear_saving = 0
    for name, spec in plan.linears.items():
        weight = model.get_submodule(name).weight
        group = resolve_group_size(weight.shape[1], spec.group_size, spec.scheme)
        linear_saving += weight.numel() * weight.element_size()
        linear_saving -= storage_nbytes(tuple(weight.shape), spec.bits, group, spec.scheme, scale_bytes)
    model_fp_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(model))
    return {
        "avg_expert_bits": expert_bits_sum / expert_params if expert_params else 0.0,
        "expert_bytes": expert_bytes,
        "expert_bytes_full_precision": expert_fp_bytes,
        "model_bytes": model_fp_bytes - expert_fp_bytes + expert_bytes - linear_saving,
        "model_bytes_full_precision": model_fp_bytes,
    }


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What a checkpoint stores: parameters (tied ones once) and persistent buffers.

    By identity, not by storage, so it also works on a meta-device skeleton."""
    tensors = list(model.parameters())
    for module in model.modules():
        tensors += [b for name, b in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set]
    return tensors
