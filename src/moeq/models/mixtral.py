"""Mixtral: fused routed experts, no shared experts, router ``mlp.gate``."""

from .base import FusedExpertsAdapter, register_adapter


@register_adapter
class MixtralAdapter(FusedExpertsAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
