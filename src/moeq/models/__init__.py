"""Architecture adapters: the structural one (every transformers 5 MoE on its experts interface,
its checkpoint names from transformers' conversion mapping) and Switch's (one module per expert)."""

from . import structural, switch  # noqa: F401  (registration)
from .base import AdapterError, LinearRole, MoEAdapter, MoELayer, auto_model_class, get_adapter, moe_layers_or_error, supported_model_types

__all__ = ["auto_model_class", "AdapterError", "LinearRole", "MoEAdapter", "MoELayer", "get_adapter", "moe_layers_or_error", "supported_model_types"]
