"""Qwen2-MoE and Qwen3-MoE: fused routed experts; Qwen2-MoE adds a gated shared expert."""

from .base import FusedExpertsAdapter, register_adapter


@register_adapter
class Qwen2MoeAdapter(FusedExpertsAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    shared_markers = ("shared_expert",)
    router_markers = ("gate", "shared_expert_gate")


@register_adapter
class Qwen3MoeAdapter(FusedExpertsAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
