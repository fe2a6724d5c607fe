"""Adapters find every MoE layer, expert projection and linear role of each family."""

import pytest
import torch
import transformers

from moeq.models import AdapterError, LinearRole, get_adapter, moe_layers_or_error, supported_model_types
from moeq.models.tiny import tiny_model

EXPECTED_LAYERS = {
    "mixtral": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen2_moe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "qwen3_moe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "olmoe": ["model.layers.0.mlp", "model.layers.1.mlp"],
    "deepseek_v3": ["model.layers.1.mlp", "model.layers.2.mlp"],  # layer 0 is dense (first_k_dense_replace)
    "switch_transformers": ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"],
}


def test_every_required_family_has_an_adapter() -> None:
    """Switch by name (one module per expert); the fused-experts families by structure."""
    for family in EXPECTED_LAYERS:
        assert get_adapter(family).family == ("switch_transformers" if family == "switch_transformers" else "structural")


def test_layers_and_experts_are_all_found(family: str) -> None:
    model = tiny_model(family)
    adapter, layers = moe_layers_or_error(model)
    assert [layer.path for layer in layers] == EXPECTED_LAYERS[family]
    for layer in layers:
        assert layer.num_experts == 8
        assert layer.router_weight.shape[0] == 8
        weights = layer.expert_weights()
        assert len(weights) == 8 * len(layer.projections)
        assert all(w.dim() == 2 for w in weights.values())
        # The adapter's view of every expert weight covers the model's expert parameters exactly once.
        experts = model.get_submodule(layer.experts_path)
        assert sum(w.numel() for w in weights.values()) == sum(p.numel() for p in experts.parameters())


def test_fused_views_are_the_halves_of_gate_up_proj() -> None:
    model = tiny_model("mixtral")
    layer = get_adapter(model).moe_layers(model)[1]
    experts = model.get_submodule(layer.experts_path)
    intermediate = experts.down_proj.shape[2]
    assert torch.equal(layer.expert_weight(5, "gate_proj"), experts.gate_up_proj[5, :intermediate])
    assert torch.equal(layer.expert_weight(5, "up_proj"), experts.gate_up_proj[5, intermediate:])
    assert torch.equal(layer.expert_weight(5, "down_proj"), experts.down_proj[5])
    with pytest.raises(KeyError, match="gate_proj, up_proj, down_proj"):
        layer.expert_weight(0, "w1")


def test_linear_roles(family: str) -> None:
    model = tiny_model(family)
    adapter, layers = moe_layers_or_error(model)
    roles = adapter.linear_roles(model)
    assert roles[[n for n in roles if n.endswith("lm_head")][0]] == LinearRole.LM_HEAD
    assert not any(".experts." in name for name in roles), "routed experts must not appear as linears"
    counts = {role: sum(r == role for r in roles.values()) for role in LinearRole.ALL}
    assert counts[LinearRole.ATTENTION] > 0
    if family == "qwen2_moe":
        assert counts[LinearRole.SHARED] == 6 and counts[LinearRole.ROUTER] == 2  # shared_expert_gate
        assert layers[0].shared_paths == ["model.layers.0.mlp.shared_expert"]
    if family == "deepseek_v3":
        assert counts[LinearRole.SHARED] == 6 and counts[LinearRole.DENSE] == 3
        assert layers[0].shared_paths == ["model.layers.1.mlp.shared_experts"]
    if family == "switch_transformers":
        assert counts[LinearRole.ROUTER] == 2 and counts[LinearRole.DENSE] == 4


def test_a_dense_model_is_refused_with_the_supported_list() -> None:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match="'llama' has no moeq adapter and no routed experts moeq can find by structure .*is it an MoE model"):
        moe_layers_or_error(model)


def test_an_moe_family_configured_without_experts_is_refused() -> None:
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[0, 1])
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match="no routed experts moeq can find by structure .* is it an MoE model"):
        moe_layers_or_error(model)
