"""Checkpoint reading and writing, and moeq's registration with transformers."""

from ..atomic import OutputExistsError, atomic_directory, atomic_write_text
from .checkpoint import CheckpointError, load, read_plan, save
from .hf import MoeqConfig, MoeqHfQuantizer

__all__ = [
    "CheckpointError",
    "MoeqConfig",
    "MoeqHfQuantizer",
    "OutputExistsError",
    "atomic_directory",
    "atomic_write_text",
    "load",
    "read_plan",
    "save",
]
