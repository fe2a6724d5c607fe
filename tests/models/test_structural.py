"""MoE families no adapter names, read by structure: transformers 5's experts interface, the router
and shared experts beside it, and the checkpoint's names from transformers' own conversion mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moeq
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.config import QuantConfig, uniform_plan
from moeq.models import AdapterError, moe_layers_or_error
from moeq.plan import PlanError

SMALL = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, num_experts=4, n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2,
             head_dim=16, max_position_embeddings=64)
# GLM-4.5 and ERNIE-4.5 (shared experts, a dense first layer), MiniMax-M2, GraniteMoE (fused experts
# and a router renamed on disk), Phi-MoE (per-expert w1/w2/w3 on disk), HunYuan (its router one module down)
FAMILIES = ["glm4_moe", "ernie4_5_moe", "minimax_m2", "granitemoe", "phimoe", "hunyuan_v1_moe"]
IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _tiny(model_type: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type)
    for key, value in SMALL.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_family_no_adapter_names_quantizes_from_its_checkpoint(model_type: str, tmp_path: Path) -> None:
    model = _tiny(model_type)
    adapter, layers = moe_layers_or_error(model)
    assert adapter.family == "structural" and layers
    for layer in layers:  # the router found beside the experts is the model's own
        block = model.get_submodule(layer.path)
        assert any(layer.router_weight is p for p in block.parameters())
        assert layer.num_experts == 4 and layer.shapes["down_proj"] == (64, layer.shapes["gate_proj"][0])
    model.save_pretrained(tmp_path / "src")  # transformers writes its own on-disk names (per-expert, renamed)
    plan = uniform_plan(model, QuantConfig(bits=4, attn_bits=8))
    moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", plan)  # read lazily through those names
    streamed = _logits(moeq.load(tmp_path / "q"))
    in_memory = _logits(moeq.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval(), plan))
    assert torch.equal(streamed, in_memory)  # the same weights whichever road read them
    assert (streamed - _logits(model)).abs().max() < 0.1  # 4-bit experts, 8-bit attention: close to the original
    report = quantize_calibrated(tmp_path / "src", plan, IDS, tmp_path / "gptq", CalibrationConfig(min_tokens=2))
    assert sum(map(sum, report.tokens)) == IDS.numel() * model.config.num_experts_per_tok * len(layers)
    assert _logits(moeq.load(tmp_path / "gptq")).isfinite().all()


def test_experts_it_cannot_read_exactly_are_refused_in_one_line() -> None:
    model = _tiny("glm4_moe")
    experts = model.model.layers[1].mlp.experts
    experts.gate_bias = torch.nn.Parameter(torch.zeros(experts.down_proj.shape[0], 8))  # a bias moeq does not know where to add
    with pytest.raises(AdapterError, match=r"Glm4MoeExperts\) keeps its experts with biases named gate_bias;"):
        moe_layers_or_error(model)


def test_experts_with_a_norm_after_each_expert_are_refused(monkeypatch) -> None:
    model = _tiny("glm4_moe")
    experts = model.model.layers[1].mlp.experts
    monkeypatch.setattr(experts, "has_post_expert_norm", True, raising=False)  # what muse_spark's experts set
    with pytest.raises(AdapterError, match="keeps its experts with a norm after each expert;"):
        moe_layers_or_error(model)


def test_a_model_with_one_routerless_experts_module_is_not_quantized_in_part() -> None:
    model = _tiny("mixtral")
    del model.model.layers[1].mlp.gate  # this block's router is gone: it would be skipped
    model.model.layers[1].mlp.gate = None
    with pytest.raises(AdapterError, match=r"model.layers.1.mlp.experts \(1 experts module\(s\) in all\) has no router moeq can find .* "
                                           "moeq will not quantize part of the model's experts"):
        moe_layers_or_error(model)


def test_zaya_router_network_and_the_state_it_carries_between_blocks(tmp_path: Path) -> None:
    """ZAYA's router is a network of its own (kept whole) whose hidden states flow from block to
    block: calibration, walking one block at a time, routes every token as the whole model does."""
    from moeq.models.base import LinearRole
    from tests.models.families import tiny_config

    config = tiny_config("zaya")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter, layers = moe_layers_or_error(model)
    assert [layer.router_path for layer in layers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    roles = adapter.linear_roles(model)
    assert roles["model.layers.1.mlp.gate.router_mlp.fc1"] == LinearRole.ROUTER  # never planned as a dense linear
    routed = [torch.zeros(layer.num_experts, dtype=torch.long) for layer in layers]

    def count(index: int):
        def hook(module, args) -> None:
            routed[index].add_(torch.bincount(args[1].reshape(-1), minlength=layers[index].num_experts))
        return hook

    hooks = [model.get_submodule(layer.experts_path).register_forward_pre_hook(count(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    for hook in hooks:
        hook.remove()
    model.save_pretrained(tmp_path / "src")
    plan = uniform_plan(model, QuantConfig(bits=4))
    report = quantize_calibrated(tmp_path / "src", plan, IDS, tmp_path / "gptq", CalibrationConfig(min_tokens=1))
    assert [list(row) for row in report.tokens] == [r.tolist() for r in routed]  # layer 1 sees layer 0's router states
    assert _logits(moeq.load(tmp_path / "gptq")).isfinite().all()
    with pytest.raises(PlanError, match="model.layers.0.mlp.gate is a router network, not an \\[experts, hidden\\] matrix"):
        moeq.allocate(tmp_path / "src", "router-maxvar", avg_bits=2.5)
    assert moeq.allocate(tmp_path / "src", "variance", avg_bits=2.5).budget["avg_expert_bits"] <= 2.5
