"""Backends that run a quantized MoE layer's experts (torch reference today)."""

from .reference import experts_forward_reference

__all__ = ["experts_forward_reference"]
