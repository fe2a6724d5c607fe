"""Bit allocation: scores, count rules, rankings and integer programs, behind ``allocate``."""

from .api import CALIBRATED_STRATEGIES, STRATEGIES, allocate
from .counts import CountError, level_counts

__all__ = ["CALIBRATED_STRATEGIES", "STRATEGIES", "CountError", "allocate", "level_counts"]
