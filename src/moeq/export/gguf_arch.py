"""How each model family is spelled in a GGUF file: llama.cpp's architecture name, its
hyper-parameter keys, and which tensor of the Hugging Face model becomes which GGUF tensor.

The names follow llama.cpp's own converter (``convert_hf_to_gguf.py``) and the tensor tables of the
``gguf`` package; a family is one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["GGUFArchitecture", "ARCHITECTURES", "architecture_for", "rope_permute_rows"]


# The stacked routed-expert tensors, by the adapters' projection names (llama.cpp's ffn_*_exps).
EXPERT_STACKS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """One family's GGUF spelling.

    ``tensors`` maps a regular expression over the Hugging Face parameter name (``(\\d+)`` = the
    block index) to the GGUF tensor name (``{bid}`` = that index); ``experts`` maps the adapter's
    projection names to the GGUF names of the stacked expert tensors; ``permute`` names the
    tensors whose rows llama.cpp wants in its rotary order (``"q"`` or ``"k"`` head counts).
    """

    arch: str
    hparams: Callable[[dict[str, Any]], dict[str, Any]]
    tensors: dict[str, str]
    experts: dict[str, str] = field(default_factory=lambda: dict(EXPERT_STACKS))
    permute: dict[str, str] = field(default_factory=dict)
    flatten: tuple[str, ...] = ()  # regexes of tensors llama.cpp holds 1-D (Hugging Face: [1, n])
    # config key -> (value, or a function of the config giving it; what llama.cpp does)
    requires: dict[str, tuple[Any, str]] = field(default_factory=dict)
    # regex of a Hugging Face weight -> function (weight [out, in], config) giving the
    # GGUF tensors llama.cpp holds in its place, as {name ({bid} = block index): array}
    splits: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    # what llama.cpp computes differently for this config although its own converter writes such files too
    # (told to the user, not refused): config -> the note, or None
    caveat: Callable[[dict[str, Any]], str | None] = lambda config: None

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse a model whose config asks for something llama.cpp's graph for this architecture
        does differently (it would load and run, and compute another function)."""
        for key, (value, behaviour) in self.requires.items():
            got = config.get(key)
            if callable(value):  # a value that depends on the rest of the config
                value = value(config)
            if (got or None) != (value or None) and got != value:
                raise ValueError(f"llama.cpp's {self.arch} {behaviour}, but this model's config has {key} = {got!r}: "
                                 "the exported file would compute a different model")

    def flattened(self, hf_name: str) -> bool:
        return any(re.fullmatch(pattern, hf_name) for pattern in self.flatten)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a (non-expert) parameter, or ``None`` if the family has no such tensor."""
        for pattern, target in self.tensors.items():
            match = re.fullmatch(pattern, hf_name)
            if match:
                groups = match.groups()
                return target.format(bid=groups[0], kind=groups[1] if len(groups) > 1 else "weight") if groups else target
        return None

    def split(self, hf_name: str) -> Callable[[Any, dict[str, Any]], dict[str, Any]] | None:
        """The function splitting ``hf_name`` into several GGUF tensors, or ``None``."""
        for pattern, function in self.splits.items():
            if re.fullmatch(pattern, hf_name):
                return function
        return None

    def permutation(self, hf_name: str) -> str | None:
        """``"q"`` or ``"k"`` for a tensor whose rows llama.cpp reorders for its rotary layout."""
        for pattern, which in self.permute.items():
            if re.fullmatch(pattern, hf_name):
                return which
        return None


def _decoder_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The hyper-parameters every decoder-only MoE architecture of llama.cpp reads."""
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    return {
        "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config.get("intermediate_size") or config["moe_intermediate_size"],  # no dense block: unused
        "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads", heads),
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "rope.freq_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "expert_count": config.get("num_local_experts") or config.get("num_experts") or config["n_routed_experts"],
        "expert_used_count": config.get("num_experts_per_tok") or _per_layer(config, "moe_topk"),
        "vocab_size": config["vocab_size"],
    }


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _heads(config: dict[str, Any]) -> dict[str, Any]:
    """Key/value widths and the rotated part of each head (``partial_rotary_factor``: rotate-half
    over the first dims, llama.cpp's NEOX order, so no q/k permutation)."""
    head_dim = _head_dim(config)
    rope = config.get("rope_parameters") or {}
    return {"attention.key_length": head_dim, "attention.value_length": head_dim,
            "rope.dimension_count": int(head_dim * rope.get("partial_rotary_factor", 1.0))}


def _yarn(config: dict[str, Any]) -> dict[str, Any]:
    """YaRN as llama.cpp's converter writes it for every family (none for other rotary types)."""
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") != "yarn":
        return {}
    out = {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
           "rope.scaling.original_context_length": rope["original_max_position_embeddings"]}
    for key, gguf_key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if rope.get(key) is not None:
            out[f"rope.scaling.{gguf_key}"] = float(rope[key])
    return out


def _per_layer(config: dict[str, Any], key: str) -> Any:
    """A setting given once or per layer (HunYuan's moe_topk); per-layer values must agree (see _SAME_EVERY_LAYER)."""
    value = config.get(key)
    return value[0] if isinstance(value, list) and value else value


def _leading_dense(config: dict[str, Any]) -> int:
    """How many dense blocks come first: ``first_k_dense_replace``, or the leading ``"dense"`` of ``mlp_layer_types``."""
    kinds = config.get("mlp_layer_types")
    if kinds:
        return next((i for i, kind in enumerate(kinds) if kind != "dense"), len(kinds))
    return config.get("first_k_dense_replace") or 0


def _dense_then_sparse(config: dict[str, Any]) -> Any:
    kinds, first = config.get("mlp_layer_types"), _leading_dense(config)
    return kinds if not kinds else ["dense"] * first + ["sparse"] * (len(kinds) - first)


# llama.cpp's leading_dense_block_count: dense blocks first, MoE blocks after
_DENSE_FIRST = {"mlp_layer_types": (_dense_then_sparse, "has its dense blocks first and MoE blocks after them")}


def _llama_moe_hparams(config: dict[str, Any]) -> dict[str, Any]:
    return {**_decoder_hparams(config), "rope.dimension_count": _head_dim(config)}


def _qwen_moe_hparams(config: dict[str, Any]) -> dict[str, Any]:
    out = {**_decoder_hparams(config), "expert_feed_forward_length": config["moe_intermediate_size"]}
    if config.get("shared_expert_intermediate_size"):
        out["expert_shared_feed_forward_length"] = config["shared_expert_intermediate_size"]
    if config.get("head_dim"):
        out["attention.key_length"] = out["attention.value_length"] = config["head_dim"]
    return out


_LAYER = r"model\.layers\.(\d+)\."
_ATTENTION = _LAYER + r"self_attn\."
_QKV = {_ATTENTION + rf"{x}_proj\.(weight|bias)": f"blk.{{bid}}.attn_{x}.{{kind}}" for x in "qkv"}  # biases where the model has them
# DeepSeek-V3-style blocks: a dense first MLP, shared experts, the router's score-correction bias
_DENSE_AND_SHARED = {
    **{_LAYER + rf"mlp\.{p}_proj\.weight": f"blk.{{bid}}.ffn_{p}.weight" for p in ("gate", "up", "down")},
    **{_LAYER + rf"mlp\.shared_experts\.{p}_proj\.weight": f"blk.{{bid}}.ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
}
_SCORE_BIAS = {_LAYER + r"mlp\.gate\.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias"}
_POST_ATTENTION_NORM = {_LAYER + r"post_attention_layernorm\.weight": "blk.{bid}.post_attention_norm.weight"}  # gpt-oss's, GLM's
# Every decoder's embedding, final norm, output head and per-block norms.
_BODY = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    _LAYER + r"input_layernorm\.weight": "blk.{bid}.attn_norm.weight",
    _LAYER + r"post_attention_layernorm\.weight": "blk.{bid}.ffn_norm.weight",
}

MIXTRAL = GGUFArchitecture(
    # llama.cpp runs Mixtral as its "llama" architecture with expert tensors.
    arch="llama",
    hparams=_llama_moe_hparams,
    tensors={
        **_BODY,
        _LAYER + r"self_attn\.q_proj\.weight": "blk.{bid}.attn_q.weight",
        _LAYER + r"self_attn\.k_proj\.weight": "blk.{bid}.attn_k.weight",
        _LAYER + r"self_attn\.v_proj\.weight": "blk.{bid}.attn_v.weight",
        _LAYER + r"self_attn\.o_proj\.weight": "blk.{bid}.attn_output.weight",
        _LAYER + r"mlp\.gate\.weight": "blk.{bid}.ffn_gate_inp.weight",
    },
    permute={_LAYER + r"self_attn\.q_proj\.weight": "q", _LAYER + r"self_attn\.k_proj\.weight": "k"},
)

_QWEN_COMMON = {
    **_BODY,
    _LAYER + r"self_attn\.o_proj\.weight": "blk.{bid}.attn_output.weight",
    _LAYER + r"mlp\.gate\.weight": "blk.{bid}.ffn_gate_inp.weight",
    **_QKV,
}
_WITH_QK_NORMS = {
    **_QWEN_COMMON,
    _LAYER + r"self_attn\.q_norm\.weight": "blk.{bid}.attn_q_norm.weight",
    _LAYER + r"self_attn\.k_norm\.weight": "blk.{bid}.attn_k_norm.weight",
}
def _rope_types(*types: str) -> tuple[Callable[[dict[str, Any]], Any], str]:
    """The requirement that ``rope_parameters`` be of one of ``types`` (or name none)."""
    def allowed(config: dict[str, Any]) -> Any:
        rope = config.get("rope_parameters") or {}
        return config["rope_parameters"] if rope.get("rope_type") in (None, *types) else {"rope_type": " or ".join(types)}

    return allowed, f"implements the {' and '.join(types)} rotary embeddings only"


_NO_RENORMALISATION = (False, "does not renormalise the top-k routing weights")
_SPARSE_ONLY = {
    "decoder_sparse_step": (1, "has a MoE block in every layer"),
    "mlp_only_layers": ([], "has a MoE block in every layer"),
}

QWEN2_MOE = GGUFArchitecture(
    arch="qwen2moe",
    hparams=_qwen_moe_hparams,
    tensors={
        **_QWEN_COMMON,
        _LAYER + r"mlp\.shared_expert\.gate_proj\.weight": "blk.{bid}.ffn_gate_shexp.weight",
        _LAYER + r"mlp\.shared_expert\.up_proj\.weight": "blk.{bid}.ffn_up_shexp.weight",
        _LAYER + r"mlp\.shared_expert\.down_proj\.weight": "blk.{bid}.ffn_down_shexp.weight",
        _LAYER + r"mlp\.shared_expert_gate\.weight": "blk.{bid}.ffn_gate_inp_shexp.weight",
    },
    flatten=(_LAYER + r"mlp\.shared_expert_gate\.weight",),
    requires={"norm_topk_prob": _NO_RENORMALISATION, **_SPARSE_ONLY},
)

QWEN3_MOE = GGUFArchitecture(
    arch="qwen3moe",
    hparams=_qwen_moe_hparams,
    tensors=_WITH_QK_NORMS,
    requires={"norm_topk_prob": (True, "renormalises the top-k routing weights"), **_SPARSE_ONLY},
)

OLMOE = GGUFArchitecture(
    arch="olmoe",
    hparams=_decoder_hparams,
    tensors=_WITH_QK_NORMS,
    requires={
        "norm_topk_prob": _NO_RENORMALISATION,
        "num_key_value_heads": (lambda c: c["num_attention_heads"],
                                "normalises k over the model's full width (as many key/value heads as query heads)"),
    },
)


def _deepseek_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's deepseek2 reads multi-head latent attention as one key/value head of width
    kv_lora_rank + rope dims, decompressed per head by k_b/v_b (as its converter writes it)."""
    kv_rank, rope_dims = config["kv_lora_rank"], config["qk_rope_head_dim"]
    out = {
        **_decoder_hparams(config),
        "attention.head_count_kv": 1,
        "leading_dense_block_count": _leading_dense(config),
        "attention.kv_lora_rank": kv_rank,
        "attention.key_length": kv_rank + rope_dims,
        "attention.value_length": kv_rank,
        "attention.key_length_mla": config["qk_nope_head_dim"] + rope_dims,
        "attention.value_length_mla": config["v_head_dim"],
        "expert_feed_forward_length": config["moe_intermediate_size"],
        "expert_shared_count": config.get("n_shared_experts") or 0,
        "expert_weights_scale": float(config.get("routed_scaling_factor") or 1.0),
        "expert_weights_norm": bool(config.get("norm_topk_prob")),
        "expert_gating_func": 2,  # sigmoid: transformers' DeepSeek-V3 router scores experts so
        "expert_group_count": config.get("n_group") or 1,
        "expert_group_used_count": config.get("topk_group") or 1,
        "rope.dimension_count": rope_dims,
    }
    if config.get("q_lora_rank"):
        out["attention.q_lora_rank"] = config["q_lora_rank"]
    out.update(_yarn(config))
    if out.get("rope.scaling.type") == "yarn":  # llama.cpp's deepseek2 reads mscale_all_dim as this multiplier (its converter's rule)
        out["rope.scaling.yarn_log_multiplier"] = 0.1 * float((config.get("rope_parameters") or {}).get("mscale_all_dim") or 0.0)
    return out


def _split_kv_b(weight, config: dict[str, Any]) -> dict[str, Any]:
    """kv_b_proj [heads * (nope + v), kv_rank] as llama.cpp's absorbed MLA holds it: k_b per head
    transposed [heads, kv_rank, nope] and v_b [heads, v, kv_rank]."""
    heads, nope, v = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
    per_head = weight.reshape(heads, nope + v, weight.shape[-1])
    return {"blk.{bid}.attn_k_b.weight": per_head[:, :nope].transpose(1, 2).contiguous(),
            "blk.{bid}.attn_v_b.weight": per_head[:, nope:].contiguous()}


DEEPSEEK_V3 = GGUFArchitecture(
    arch="deepseek2",
    hparams=_deepseek_hparams,
    tensors={
        **_BODY,
        _ATTENTION + r"q_proj\.weight": "blk.{bid}.attn_q.weight",
        _ATTENTION + r"q_a_proj\.weight": "blk.{bid}.attn_q_a.weight",
        _ATTENTION + r"q_a_layernorm\.weight": "blk.{bid}.attn_q_a_norm.weight",
        _ATTENTION + r"q_b_proj\.weight": "blk.{bid}.attn_q_b.weight",
        _ATTENTION + r"kv_a_proj_with_mqa\.weight": "blk.{bid}.attn_kv_a_mqa.weight",
        _ATTENTION + r"kv_a_layernorm\.weight": "blk.{bid}.attn_kv_a_norm.weight",
        _ATTENTION + r"o_proj\.weight": "blk.{bid}.attn_output.weight",
        _LAYER + r"mlp\.gate\.weight": "blk.{bid}.ffn_gate_inp.weight",
        **_SCORE_BIAS,
        **_DENSE_AND_SHARED,
    },
    splits={_ATTENTION + r"kv_b_proj\.weight": _split_kv_b},
    requires={
        **_DENSE_FIRST,
        "rope_interleave": (True, "rotates q/k pairs as interleaved (rope_interleave = True)"),
        "attention_bias": (False, "has no attention biases"),
        # llama.cpp takes a deepseek2 of 26 or 27 layers for DeepSeek-V2-Lite (q_proj, no q_lora_rank), every other one for q_a/q_b
        "q_lora_rank": (lambda c: c.get("q_lora_rank") if bool(c.get("q_lora_rank")) != (c["num_hidden_layers"] in (26, 27))
                        else "a rank" if c.get("q_lora_rank") is None else None,
                        "reads q_a/q_b (q_lora_rank) at every layer count but 26 and 27, where it reads q_proj alone"),
        "rope_parameters": _rope_types("default", "yarn"),
    },
)

def _gpt_oss_hparams(config: dict[str, Any]) -> dict[str, Any]:
    return {
        **_decoder_hparams(config),
        **_heads(config),
        **_yarn(config),
        "expert_feed_forward_length": config["intermediate_size"],
        "attention.sliding_window": config["sliding_window"],
    }


def _gpt_oss_caveat(config: dict[str, Any]) -> str | None:
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        return ("llama.cpp rounds YaRN's correction range to whole dimensions, as it does for every gpt-oss GGUF, while this "
                "model's rope_parameters say truncate = false (transformers, vLLM and SGLang do not round): some rotary "
                "frequencies differ, which shows at positions far into the context")
    return None


GPT_OSS = GGUFArchitecture(
    # llama.cpp's "gpt-oss" (its openai-moe graph): biases on attention, router and every expert
    # stack, attention sinks, sliding-window attention on every other layer, a clamped SwiGLU.
    arch="gpt-oss",
    hparams=_gpt_oss_hparams,
    tensors={
        **_BODY,
        **_POST_ATTENTION_NORM,
        **_QKV,
        _ATTENTION + r"o_proj\.(weight|bias)": "blk.{bid}.attn_output.{kind}",
        _ATTENTION + r"sinks": "blk.{bid}.attn_sinks.weight",
        _LAYER + r"mlp\.router\.(weight|bias)": "blk.{bid}.ffn_gate_inp.{kind}",
    },
    requires={
        "swiglu_limit": (7.0, "clamps its SwiGLU at 7.0"),
        "swiglu_alpha": (1.702, "scales the SwiGLU gate's sigmoid by 1.702"),
        "layer_types": (lambda c: [("sliding_attention", "full_attention")[i % 2] for i in range(c["num_hidden_layers"])],
                        "alternates sliding-window and full attention, the sliding one first"),
        "attention_bias": (True, "reads biases on q, k, v and the output projection"),
        "rope_parameters": _rope_types("default", "yarn"),
    },
    caveat=_gpt_oss_caveat,
)

def _sigmoid_moe_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3-style routing without its attention (GLM-4.5, dots.llm1): sigmoid scores, the
    score-correction bias choosing, a routed scale, shared experts, dense first layers."""
    return {
        **_decoder_hparams(config),
        **_heads(config),
        "expert_feed_forward_length": config["moe_intermediate_size"],
        "expert_shared_count": config.get("n_shared_experts") or 0,
        "leading_dense_block_count": _leading_dense(config),
        "expert_gating_func": 2,  # sigmoid, as transformers' GLM-4.5 router scores experts
        "expert_weights_scale": float(config.get("routed_scaling_factor") or 1.0),
        "expert_weights_norm": bool(config.get("norm_topk_prob")),
    }


GLM4_MOE = GGUFArchitecture(
    # llama.cpp's glm4moe: partial rotary, optional q/k norms and attention biases, a norm after
    # attention, sigmoid routing with the score-correction bias, shared experts, dense first layers.
    arch="glm4moe",
    hparams=_sigmoid_moe_hparams,
    tensors={
        **_BODY,
        **_POST_ATTENTION_NORM,
        **_QKV,
        _ATTENTION + r"o_proj\.weight": "blk.{bid}.attn_output.weight",
        _ATTENTION + r"q_norm\.weight": "blk.{bid}.attn_q_norm.weight",
        _ATTENTION + r"k_norm\.weight": "blk.{bid}.attn_k_norm.weight",
        _LAYER + r"mlp\.gate\.weight": "blk.{bid}.ffn_gate_inp.weight",
        **_SCORE_BIAS,
        **_DENSE_AND_SHARED,
    },
    requires={
        **_DENSE_FIRST,
        "n_group": (1, "does not limit routing to groups of experts (n_group = 1)"),
        "topk_group": (1, "does not limit routing to groups of experts (topk_group = 1)"),
        "rope_parameters": _rope_types("default"),
    },
)

DOTS1 = GGUFArchitecture(
    # llama.cpp's dots1: Qwen3's attention (q/k norms) with DeepSeek-V3's routing, no sliding window.
    arch="dots1",
    hparams=_sigmoid_moe_hparams,
    tensors={
        **_WITH_QK_NORMS,
        **_SCORE_BIAS,
        **_DENSE_AND_SHARED,
    },
    requires={
        **_DENSE_FIRST,
        "n_group": (1, "does not limit routing to groups of experts (n_group = 1)"),
        "topk_group": (1, "does not limit routing to groups of experts (topk_group = 1)"),
        "layer_types": (lambda c: ["full_attention"] * c["num_hidden_layers"], "has no sliding-window attention"),
        "num_key_value_heads": (lambda c: c["num_attention_heads"], "holds as many key/value heads as query heads"),
        "rope_parameters": _rope_types("default"),
    },
)

def _minimax_m2_hparams(config: dict[str, Any]) -> dict[str, Any]:
    return {
        **_decoder_hparams(config),
        **_heads(config),
        "expert_feed_forward_length": config["intermediate_size"],
        "expert_gating_func": 2,  # sigmoid; llama.cpp's minimax-m2 always renormalises the top-k, as transformers' does
    }


MINIMAX_M2 = GGUFArchitecture(
    # llama.cpp's minimax-m2: q/k norms over all heads at once, partial rotary (rotate-half, no
    # permutation), sigmoid routing with the block's score-correction bias.
    arch="minimax-m2",
    hparams=_minimax_m2_hparams,
    tensors={
        **_WITH_QK_NORMS,
        _LAYER + r"mlp\.e_score_correction_bias": "blk.{bid}.exp_probs_b.bias",
    },
    requires={"rope_parameters": _rope_types("default")},
)

def _deepseek_v2_hparams(config: dict[str, Any]) -> dict[str, Any]:
    # transformers' DeepSeek-V2 router: softmax scores, greedy top-k, never renormalised, then scaled
    return {**_deepseek_hparams(config), "expert_gating_func": 1, "expert_weights_norm": False}


DEEPSEEK_V2 = replace(
    DEEPSEEK_V3,
    hparams=_deepseek_v2_hparams,
    requires={
        **{key: rule for key, rule in DEEPSEEK_V3.requires.items() if key != "rope_interleave"},  # V2 always interleaves
        "topk_method": ("greedy", "does not limit routing to groups of experts the way DeepSeek-V2 does (topk_method greedy)"),
    },
)

def _hunyuan_hparams(config: dict[str, Any]) -> dict[str, Any]:
    head_dim, rope = _head_dim(config), config.get("rope_parameters") or {}
    out = {
        **_decoder_hparams(config),
        **_heads(config),
        # transformers' HunYuan gives every expert and the shared MLP intermediate_size
        "expert_feed_forward_length": config["intermediate_size"],
        "expert_shared_feed_forward_length": config["intermediate_size"],
    }
    if rope.get("rope_type") == "dynamic" and rope.get("alpha"):  # NTK-alpha: a fixed stretch of the base, as transformers computes it
        out["rope.freq_base"] = float(rope["rope_theta"] * rope["alpha"] ** (head_dim / (head_dim - 2)))
    return out


def _same_every_layer(key: str) -> tuple[Callable[[dict[str, Any]], Any], str]:
    def rule(config: dict[str, Any]) -> Any:
        value = config.get(key)
        return [value[0]] * len(value) if isinstance(value, list) and value else value

    return rule, f"holds one {key} for every layer"


HUNYUAN_MOE = GGUFArchitecture(
    # llama.cpp's hunyuan-moe: q/k norms after the rotation, a shared MLP beside the routed experts,
    # softmax routing renormalised over the top-k.
    arch="hunyuan-moe",
    hparams=_hunyuan_hparams,
    tensors={
        **_BODY,
        **_QKV,
        _ATTENTION + r"o_proj\.weight": "blk.{bid}.attn_output.weight",
        _ATTENTION + r"query_layernorm\.weight": "blk.{bid}.attn_q_norm.weight",
        _ATTENTION + r"key_layernorm\.weight": "blk.{bid}.attn_k_norm.weight",
        _LAYER + r"mlp\.gate\.wg\.weight": "blk.{bid}.ffn_gate_inp.weight",
        **{_LAYER + rf"mlp\.shared_mlp\.{p}_proj\.weight": f"blk.{{bid}}.ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
    },
    requires={
        "moe_topk": _same_every_layer("moe_topk"),
        "rope_parameters": (lambda c: c["rope_parameters"] if (c.get("rope_parameters") or {}).get("rope_type") in (None, "default")
                            or ((c.get("rope_parameters") or {}).get("rope_type") == "dynamic" and c["rope_parameters"].get("alpha"))
                            else {"rope_type": "default, or dynamic with a fixed alpha"},
                            "implements HunYuan's default and fixed-alpha NTK rotary embeddings only"),
    },
)

ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen3_moe": QWEN3_MOE, "olmoe": OLMOE, "deepseek_v3": DEEPSEEK_V3,
    "gpt_oss": GPT_OSS, "glm4_moe": GLM4_MOE, "dots1": DOTS1, "minimax_m2": MINIMAX_M2, "deepseek_v2": DEEPSEEK_V2,
    "hunyuan_v1_moe": HUNYUAN_MOE,
    # the same graphs under other names, as llama.cpp's converter maps them
    "glm4_moe_lite": DEEPSEEK_V3,  # GLM-4.7-Flash: DeepSeek-V3's attention and routing
    "solar_open": GLM4_MOE,  # Solar Open: GLM-4.5's layout
}


def architecture_for(model_type: str) -> GGUFArchitecture:
    """The GGUF spelling of ``model_type``; one line naming the supported ones otherwise."""
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export does not know the {model_type!r} family yet; it exports: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def rope_permute_rows(rows: int, heads: int) -> list[int]:
    """Row order llama.cpp's rotary embedding wants for a q or k projection of ``heads`` heads:
    within each head, the two halves that Hugging Face rotates together are interleaved."""
    head_dim = rows // heads
    half = head_dim // 2
    order = []
    for head in range(heads):
        base = head * head_dim
        for i in range(half):
            order += [base + i, base + half + i]
    return order
