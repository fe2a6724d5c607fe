"""Measuring a (quantized) model: perplexity, KL to a reference, routing agreement, bytes, speed."""

from .api import EvalReport, evaluate

__all__ = ["EvalReport", "evaluate"]
