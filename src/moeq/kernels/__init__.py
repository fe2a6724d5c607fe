"""Backends that run a quantized MoE layer's experts: torch reference, CPU path, Triton kernels."""

from .dispatch import BACKENDS, moe_experts_forward
from .reference import experts_forward_reference

__all__ = ["BACKENDS", "experts_forward_reference", "moe_experts_forward"]
