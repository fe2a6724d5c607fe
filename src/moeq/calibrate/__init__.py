"""Statistics that need data: routing counts and weights, and per-expert input second moments."""

from .routing import RoutingStats, collect_routing, tokenize_calibration

__all__ = ["RoutingStats", "collect_routing", "tokenize_calibration"]
