"""Quantized modules that replace a model's linears and experts."""

from .experts import QuantizedExperts
from .linear import QuantizedLinear

__all__ = ["QuantizedExperts", "QuantizedLinear"]
