"""Architecture adapters (one file per family) and their registry."""

from . import deepseek, mixtral, olmoe, qwen_moe, structural, switch  # noqa: F401  (registration)
from .base import AdapterError, LinearRole, MoEAdapter, MoELayer, auto_model_class, get_adapter, moe_layers_or_error, supported_model_types

__all__ = ["auto_model_class", "AdapterError", "LinearRole", "MoEAdapter", "MoELayer", "get_adapter", "moe_layers_or_error", "supported_model_types"]
