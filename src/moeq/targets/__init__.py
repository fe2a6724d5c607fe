"""Targets: what a runtime can run, as data. A plan made for a target holds only its types, at
its granularity, and its budget counts the target file's true bytes.

==========  ===========  ==========================================================================
target      granularity  types
==========  ===========  ==========================================================================
``moeq``    expert       any moeq spec (widths 1-8, every scheme), a width per expert (moeq's runtime)
``gguf``    tensor       llama.cpp's Q2_K Q3_K Q4_0 Q4_K Q5_0 Q5_K Q6_K Q8_0 (F16: unquantized);
                         one type per (layer, projection) expert stack
``vllm``    layer        vLLM's MoE kernels (compressed-tensors pack-quantized): W4A16 sym or asym,
                         W8A16 sym; groups of 32/64/128 or per channel (the run's ``--scheme``
                         and ``--group-size``); one scheme per MoE layer, scales in the model's dtype
==========  ===========  ==========================================================================
"""

from .target import GRANULARITIES, TARGETS, Target, TargetType, compressed_tensors_nbytes, get_target, vllm_target

__all__ = ["GRANULARITIES", "TARGETS", "Target", "TargetType", "compressed_tensors_nbytes", "get_target", "vllm_target"]
