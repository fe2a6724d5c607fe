"""Mixtral: fused routed experts, no shared experts, router ``mlp.gate``.

Checkpoints from before transformers 5 name the block ``block_sparse_moe`` and the expert
projections ``w1`` (gate), ``w3`` (up) and ``w2`` (down); the lazy reader accepts both.
"""

from .base import FusedExpertsAdapter, register_adapter


@register_adapter
class MixtralAdapter(FusedExpertsAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    disk_renames = ((".mlp.", ".block_sparse_moe."),)
    disk_projection_names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
