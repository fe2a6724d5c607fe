"""Targets: what a runtime can run, as data. A plan made for a target holds only its types, at
its granularity, and its budget counts the target file's true bytes.

==========  ===========  ==========================================================================
target      granularity  types
==========  ===========  ==========================================================================
``moeq``    expert       any moeq spec (widths 1-8, every scheme), a width per expert (moeq's runtime)
``gguf``    tensor       llama.cpp's Q2_K Q3_K Q4_0 Q4_K Q5_0 Q5_K Q6_K Q8_0 (F16: unquantized);
                         one type per (layer, projection) expert stack
==========  ===========  ==========================================================================
"""

from .target import GRANULARITIES, TARGETS, Target, TargetType, get_target

__all__ = ["GRANULARITIES", "TARGETS", "Target", "TargetType", "get_target"]
