"""Tiny random models of every supported family, built from a config (nothing is downloaded).

Used by the tests and by ``moeq demo`` until the trained default model exists. Sizes are
small enough for a full quantize-save-load cycle in well under a second, but keep the real
structure: several MoE layers, shared experts and a dense first layer where the family has them.
"""

from __future__ import annotations

import torch
import transformers

from .base import auto_model_class
from torch import nn

__all__ = ["TINY_FAMILIES", "tiny_config", "tiny_model"]

_COMMON = dict(
    vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A small config of ``family`` (a model_type moeq supports)."""
    if family == "mixtral":
        return transformers.MixtralConfig(**_COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **_COMMON, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=64,
            num_experts=8, num_experts_per_tok=2,
        )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_COMMON, intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, head_dim=16
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(**_COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=128,
            moe_intermediate_size=32, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        )
    if family == "switch_transformers":
        return transformers.SwitchTransformersConfig(
            vocab_size=256, d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8, expert_capacity=64,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
    raise ValueError(f"no tiny config for {family!r}; families: {', '.join(TINY_FAMILIES)}")


TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "switch_transformers")


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny model of ``family`` in eval mode, reproducible from ``seed``."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    return auto_model_class(config).from_config(config).eval()
