"""Bit allocation: scores, count rules, rankings and integer programs, behind ``allocate``."""

from .api import CALIBRATED_STRATEGIES, STRATEGIES, AllocationConfig, allocate
from .counts import CountError, level_counts

__all__ = ["AllocationConfig", "CALIBRATED_STRATEGIES", "STRATEGIES", "CountError", "allocate", "level_counts"]
