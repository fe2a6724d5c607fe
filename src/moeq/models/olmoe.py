"""OLMoE: fused routed experts, no shared experts."""

from .base import FusedExpertsAdapter, register_adapter


@register_adapter
class OlmoeAdapter(FusedExpertsAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
