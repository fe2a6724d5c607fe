"""Every model type of the installed transformers whose modeling uses the experts interface, and a
tiny config of each (small hidden size, 2 layers, 4 experts), built from its own config class.

``experts_interface_types()`` enumerates them from transformers' sources (the modules that use
``use_experts_implementation``); ``tiny_config(model_type)`` shrinks a type's default config and
makes it consistent (per-layer lists cut to the layer count, MoE placement knobs that would leave
no MoE layer, multi-head latent attention dims); ``check_family`` runs one type through moeq.
Types without a causal-LM class say what they are (``ExpertsType.reason``); those moeq cannot
read yet are in :data:`UNSUPPORTED` with the line moeq refuses them with. Used by
``tests/models/test_every_family.py`` and ``benchmarks/families.py`` (which writes README's list).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

# model type -> the start of the one line moeq refuses it with (what it cannot read yet)
UNSUPPORTED: dict[str, str] = {}
# Types whose published checkpoints keep each layer's experts fused (one tensor per projection), so
# vLLM's compressed-tensors MoE loader, which reads experts.E.<projection>, has no names to read:
# ``moeq export --format compressed-tensors`` refuses them with this line.
FUSED_ON_DISK = "whose checkpoints do not name one linear per expert"
NOT_EXPORTED = {
    "aria_text", "dots3_note", "dots3_note_text", "gemma4", "gemma4_text", "gpt_oss", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hy_v4", "inkling2_text", "inkling_text", "minimax_m3_vl_text", "mistral4", "nemotron_h",
    "zaya",
}
# Quantized logits stay within this fraction of the largest full-precision logit (3-bit experts of
# random tiny models; measured worst 0.39 of it, axk1: benchmarks/families.py).
CLOSE = 0.5

TINY = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, num_experts=4, n_routed_experts=4, num_local_experts=4,
    num_experts_per_tok=2, head_dim=16, max_position_embeddings=64,
)
LAYERS = TINY["num_hidden_layers"]
NESTED = ("text_config", "thinker_config", "llm_config", "language_config")


@dataclass(frozen=True)
class ExpertsType:
    """A model type using the experts interface: its modeling module and causal-LM class (``None``:
    it has none, ``reason`` says what it has)."""

    model_type: str
    module: str
    causal_lm: str | None
    reason: str = ""


def experts_interface_types() -> list[ExpertsType]:
    """Every config type of the installed transformers whose modeling module uses the experts interface."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    modules = {p.parent.name for p in root.glob("*/modeling_*.py") if "use_experts_implementation" in p.read_text()}
    out = []
    for model_type, config_name in sorted(CONFIG_MAPPING_NAMES.items()):
        module = model_type_to_module_name(model_type)
        if module not in modules:
            continue
        if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            out.append(ExpertsType(model_type, module, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))
            continue
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        classes = {n: c for n, c in vars(modeling).items() if inspect.isclass(c) and c.__module__ == modeling.__name__
                   and getattr(getattr(c, "config_class", None), "__name__", None) == config_name}
        causal = sorted(n for n in classes if n.endswith("ForCausalLM"))
        if causal:  # defined, but left out of the auto mapping
            out.append(ExpertsType(model_type, module, causal[0]))
            continue
        heads = sorted(n for n in classes if "For" in n)
        reason = (f"no causal-LM class (it has {', '.join(heads)})" if heads
                  else f"a sub-config ({config_name}) of a composite model, with no model head of its own")
        out.append(ExpertsType(model_type, module, None, reason))
    return out


def _has(config, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:  # noqa: BLE001 - per-layer heterogeneous configs raise on some attributes
        return False


def _set(config, **values) -> None:
    for key, value in values.items():
        if _has(config, key):
            setattr(config, key, value)


def tiny_config(model_type: str):
    """A small, consistent config of ``model_type`` (2 layers, 4 experts, hidden 64, vocab 128)."""
    from transformers import AutoConfig

    if model_type in KWARG_BUILDS:  # per-layer configs whose sizes can only be given at construction
        return AutoConfig.for_model(model_type, **KWARG_BUILDS[model_type]())
    config = AutoConfig.for_model(model_type)
    parts = [config] + [getattr(config, n) for n in NESTED if hasattr(getattr(config, n, None), "to_dict")]
    for part in parts:
        layers = getattr(part, "num_hidden_layers", None)
        original = {k: getattr(part, k) for k in ("head_dim", "qk_rope_head_dim") if _has(part, k)}
        _set(part, **TINY)
        if layers and layers != LAYERS:  # per-layer lists follow the layer count
            for key, value in list(vars(part).items()):
                if isinstance(value, (list, tuple)) and len(value) == layers and not key.startswith("_"):
                    setattr(part, key, type(value)(value[:LAYERS]))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(part, key, None)
            if (isinstance(value, int) and value >= TINY["vocab_size"]) or (isinstance(value, list) and max(value) >= TINY["vocab_size"]):
                setattr(part, key, 0 if key == "pad_token_id" else None)
        _consistent(part, original)
    fix = FIXES.get(model_type)
    if fix is not None:
        fix(config)
    return config


def _consistent(config, original: dict) -> None:
    """MoE placement that would leave no MoE layer in 2, group-limited routing over 4 experts, MLA dims."""
    if isinstance(getattr(config, "first_k_dense_replace", None), int) and config.first_k_dense_replace > 1:
        config.first_k_dense_replace = 1
    if isinstance(getattr(config, "mlp_only_layers", None), (list, tuple)) and config.mlp_only_layers:
        config.mlp_only_layers = []
    if isinstance(getattr(config, "decoder_sparse_step", None), int) and config.decoder_sparse_step > 1:
        config.decoder_sparse_step = 1
    for key in ("n_group", "topk_group"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > 1:
            setattr(config, key, 1)
    kinds = getattr(config, "mlp_layer_types", None)
    if isinstance(kinds, list) and kinds and "sparse" not in kinds and "dense" in kinds:
        config.mlp_layer_types = ["dense"] * (LAYERS - 1) + ["sparse"]
    if "qk_rope_head_dim" in original:  # multi-head latent attention has head dims of its own
        rope_is_head = original.get("head_dim") == original["qk_rope_head_dim"]
        _set(config, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=32,
             num_key_value_heads=config.num_attention_heads, head_dim=8 if rope_is_head else 16)
        if _has(config, "qk_head_dim"):
            try:
                config.qk_head_dim = 16
            except Exception:  # noqa: BLE001 - a property on some configs
                pass
        if getattr(config, "q_lora_rank", None):
            config.q_lora_rank = 32
        _set(config, index_head_dim=16, index_n_heads=2, index_topk=4)


def _gemma4_text() -> dict:
    return dict(
        vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, hidden_size_per_layer_input=16, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
        max_position_embeddings=64, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=48,
    )


def _dots3_text() -> dict:
    return dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, shared_experts_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        head_dim=16, index_topk=4, index_head_dim=16, index_n_heads=2, max_position_embeddings=64, sliding_window=8,
        first_k_dense_replace=1, pad_token_id=None, bos_token_id=None, eos_token_id=None,
        swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=32, swa_head_dim=16,
        swa_qk_nope_head_dim=8, swa_v_head_dim=16,
    )


KWARG_BUILDS = {
    "gemma4_text": _gemma4_text,
    "gemma4": lambda: dict(text_config=_gemma4_text(), vision_config=None, audio_config=None, boi_token_id=1000,
                           eoi_token_id=1001, image_token_id=1002, video_token_id=1003, boa_token_id=1004,
                           eoa_token_index=1005, audio_token_id=1006),
    "dots3_note_text": _dots3_text,
    "dots3_note": lambda: dict(text_config=_dots3_text(), vision_config={"adapter_out_dim": 64}, audio_config={"adapter_out_dim": 64}),
}

FIXES = {  # what a type's tiny config needs beyond the generic rules
    "dots1": lambda c: _set(c, n_shared_experts=c.n_shared_experts or 1),
    "zaya": lambda c: _set(c, num_experts_per_tok=1),
    "lfm2_moe": lambda c: _set(c, layer_types=["conv", "full_attention"], num_dense_layers=1),
    "granitemoehybrid": lambda c: _set(c, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=8,
                                       layer_types=["linear_attention", "full_attention"]),
}


def check_compressed_export(model_type: str, folder: Path) -> None:
    """Quantize ``model_type`` tiny at 4 bits (symmetric, per channel: what vLLM runs), export it as
    compressed-tensors and read that with transformers' own loader: its logits equal moeq's run of
    the checkpoint (float32; summed in another order). Raises the export's one-line refusal where
    moeq refuses the type."""
    import moeq
    from moeq.config import QuantConfig
    from moeq.export import export_compressed
    from moeq.models import auto_model_class
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    moeq.save(moeq.quantize(model, QuantConfig(bits=4, scheme="sym")), folder / "q")
    report = export_compressed(folder / "q", folder / "ct")
    assert report.transformers_note is None
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    served = AutoModelForCausalLM.from_pretrained(folder / "ct").eval()
    assert type(served.config.quantization_config).__name__ == "CompressedTensorsConfig"
    torch.testing.assert_close(_logits(served, ids), _logits(moeq.load(folder / "q"), ids), atol=1e-5, rtol=0)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def check_family(model_type: str, folder: Path) -> dict:
    """Build ``model_type`` tiny, quantize it at 3 bits, save it, and read it back three ways:
    ``moeq.load``, transformers' ``from_pretrained``, and quantizing its saved checkpoint block by
    block. Raises moeq's one-line error where moeq refuses the type, AssertionError where a
    result differs; returns what it measured."""
    import moeq
    from moeq.config import QuantConfig, uniform_plan
    from moeq.models import auto_model_class, moe_layers_or_error
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    reference = _logits(model, ids)
    adapter, layers = moe_layers_or_error(model)
    plan = uniform_plan(model, QuantConfig(bits=3))
    model.save_pretrained(folder / "source")
    moeq.quantize_checkpoint(folder / "source", folder / "streamed", plan)
    assert {layer.experts_path for layer in layers} == {n for n, m in model.named_modules() if hasattr(m, "has_gate")}
    quantized = moeq.quantize(copy.deepcopy(model), plan)
    ours = _logits(quantized, ids)
    assert not torch.equal(ours, reference)  # the experts really are 3-bit
    assert (ours - reference).abs().max() <= CLOSE * reference.abs().max()
    # the model's own experts module, given the dequantized weights, computes what moeq's packed
    # layer does: the same routing, activation or own gate function, and shared experts
    dense = copy.deepcopy(model)
    for packed in moe_layers_or_error(quantized)[1]:
        adapter.fill_experts(dense.get_submodule(packed.experts_path), packed)
    torch.testing.assert_close(_logits(dense, ids), ours, atol=1e-4, rtol=1e-4)  # float32, summed in another order
    moeq.save(quantized, folder / "q")
    assert torch.equal(_logits(moeq.load(folder / "q"), ids), ours)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder / "q").eval(), ids), ours)
    assert torch.equal(_logits(moeq.load(folder / "streamed"), ids), ours)
    return {"moe_layers": len(layers), "experts": layers[0].num_experts, "gated": layers[0].gated,
            "own_gate": hasattr(layers[0].act_fn, "combine"), "error_vs_fp": float((ours - reference).abs().max() / reference.abs().max())}
