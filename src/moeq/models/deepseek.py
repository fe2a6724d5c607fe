"""DeepSeek-V3: fused routed experts, shared experts, a router bias buffer, dense first layers.

The router's ``e_score_correction_bias`` is a buffer of the router module and is never touched;
the first ``first_k_dense_replace`` layers are plain MLPs (role ``dense``).
"""

from .base import FusedExpertsAdapter, register_adapter


@register_adapter
class DeepseekV3Adapter(FusedExpertsAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    shared_markers = ("shared_experts",)
