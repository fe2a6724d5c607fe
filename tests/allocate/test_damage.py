"""Predicted damage against a direct computation, and the ``auto`` strategy's guarantees."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moeq.allocate import allocate
from moeq.allocate.api import _one_bit_aware_spec
from moeq.allocate.damage import DamageTable, RoutedInputs, damage_table, layer_damage, layer_sensitivity, predicted_damage, probe_ids
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.quant.rtn import quantize_rtn


def tokens(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def spec(bits: int, in_features: int | None = None):
    return _one_bit_aware_spec(bits, "asym", None)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_damage_equals_the_change_of_the_layer_output(family: str) -> None:
    """D(e, b) = Σ_t ‖layer output with only expert e quantized − original‖², computed directly
    by calling the experts module with one expert's weights replaced (float64 sums, rtol 1e-4)."""
    model = tiny_model(family).eval()
    adapter, layers = moe_layers_or_error(model)
    layer = layers[0]
    experts = model.get_submodule(layer.experts_path)
    calls: list[tuple] = []
    handle = experts.register_forward_pre_hook(lambda module, args: calls.append(args))
    routed = RoutedInputs(adapter, layer, max_rows=10**6)
    handle2 = experts.register_forward_pre_hook(routed)
    ids = tokens(4, 16)
    with torch.no_grad():
        model(input_ids=ids, **({"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}))
    handle.remove()
    handle2.remove()
    widths = (3, 2, 1)
    damage, prior, parts = layer_damage(layer, routed, widths, spec, list(range(layer.num_experts)), normalize=False,
                                        per_projection=True)
    reached = [e for e in range(layer.num_experts) if not prior[e]]
    assert len(reached) >= 2

    def direct(expert: int, bits: int, projections) -> float:
        changed = copy.deepcopy(experts)
        changed_layer = adapter.moe_layers(model)[0]
        with torch.no_grad():
            for projection in projections:
                weight = changed_layer.expert_weight(expert, projection)
                q = quantize_rtn(weight, spec(bits).bits, spec(bits).scheme).dequantize(torch.float32)
                _set_expert_weight(changed, family, expert, projection, q, layer)
        total = 0.0
        for args in calls:
            with torch.no_grad():
                difference = changed(*args) - experts(*args)
            total += float(difference.double().pow(2).sum())
        return total

    for expert in (reached[0], reached[-1]):
        for j, bits in enumerate(widths):
            assert damage[expert][j] == pytest.approx(direct(expert, bits, layer.projections), rel=1e-4)
        # per projection (the GGUF target's ILP): that projection alone quantized, the others original
        p = len(layer.projections) - 1
        assert parts[expert][1][p] == pytest.approx(direct(expert, widths[1], [layer.projections[p]]), rel=1e-4)


def _set_expert_weight(experts, family: str, expert: int, projection: str, value: torch.Tensor, layer) -> None:
    if family == "switch_transformers":
        getattr(experts, f"expert_{expert}").get_submodule(projection).weight.copy_(value)
        return
    intermediate = layer.shapes["gate_proj"][0]
    if projection == "gate_proj":
        experts.gate_up_proj[expert, :intermediate].copy_(value)
    elif projection == "up_proj":
        experts.gate_up_proj[expert, intermediate:].copy_(value)
    else:
        experts.down_proj[expert].copy_(value)


@pytest.mark.parametrize("budget", [1.5, 2.0, 2.5, 3.25])
def test_auto_meets_the_budget_and_is_deterministic(budget: float) -> None:
    model = tiny_model("mixtral")
    plan = allocate(model, "auto", avg_bits=budget, calibration=tokens())
    assert plan.budget["avg_expert_bits"] <= budget + 1e-9
    assert plan.method["levels"] == [4, 3, 2, 1]
    assert plan.budget["predicted_damage"] >= 0
    again = allocate(model, "auto", avg_bits=budget, calibration=tokens())
    assert again.to_json() == plan.to_json()


def test_auto_minimises_predicted_damage_by_brute_force() -> None:
    """On one layer of 4 experts and widths {2, 1}, the chosen plan is the cheapest of all 2^4."""
    model = tiny_model("mixtral")
    table = predicted_damage(model, tokens(), (2, 1), spec, [[0, 1, 2, 3, 4, 5, 6, 7]] * 2)
    table = DamageTable(table.widths, [row[:4] for row in table.damage[:1]], [table.tokens[0][:4]], [table.prior[0][:4]])
    from moeq.allocate.api import _error_ilp_widths

    class Layer:  # the ILP needs sizes only
        num_experts = 4
        expert_numel = 100

    chosen = _error_ilp_widths([Layer()], (2, 1), table.damage, avg_bits=1.5)
    best = min(
        ([[2 if (mask >> e) & 1 else 1 for e in range(4)]] for mask in range(16) if bin(mask).count("1") <= 2),
        key=table.total,
    )
    assert table.total(chosen) == pytest.approx(table.total(best))


def test_expert_without_tokens_gets_the_prior_and_is_recorded() -> None:
    model = tiny_model("deepseek_v3")
    model.model.layers[1].mlp.gate.e_score_correction_bias[5] = -1e4  # unreachable
    plan = allocate(model, "auto", avg_bits=2.5, calibration=tokens())
    assert [0, 5] in plan.method["damage"]["prior_experts"]
    damage = plan.scores["predicted_damage"]
    assert damage["tokens"][0][5] == 0 and damage["prior"][0][5]
    assert all(d > 0 for d in damage["damage"][0][5])  # the prior is a real, positive estimate
    assert damage["damage"][0][5] == sorted(damage["damage"][0][5])  # more damage at fewer bits (4,3,2,1)


def test_auto_with_a_byte_budget(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    two = allocate(model, "uniform", avg_bits=2)
    plan = allocate(model, "auto", max_bytes=two.budget["model_bytes"], calibration=tokens())
    assert plan.budget["model_bytes"] <= two.budget["model_bytes"]
    assert plan.budget["predicted_damage"] <= allocate(model, "auto", avg_bits=2, levels=(2,), calibration=tokens()).budget["predicted_damage"]


def test_gptq_table_is_calibrated_by_rounding_probes_over_rounding_damage() -> None:
    # The probes round; KL per unit of damage must be measured against rounding's own damage.
    model = tiny_model("mixtral")
    ids, widths = tokens(), (3, 2, 1)
    positions = [list(range(layer.num_experts)) for layer in moe_layers_or_error(model)[1]]
    table = damage_table(model, ids, widths, spec, positions, "gptq")
    rounding = predicted_damage(model, ids, widths, spec, positions, "rtn")
    assert table.sensitivity == layer_sensitivity(model, probe_ids(ids), rounding, spec)
    uncalibrated = predicted_damage(model, ids, widths, spec, positions, "gptq")
    for i, layer in enumerate(uncalibrated.damage):
        for e, row in enumerate(layer):
            assert table.damage[i][e] == pytest.approx([d * table.sensitivity[i][j] for j, d in enumerate(row)], rel=1e-12)


def test_gptq_damage_is_priced_with_the_settings_that_will_run() -> None:
    """The damage model quantizes through the runner's recipe, with the run's damping and column
    order: different GPTQ settings give a different table (they were ignored before)."""
    from moeq.modules.recipe import GPTQOptions

    model = tiny_model("mixtral").eval()
    adapter, layers = moe_layers_or_error(model)
    layer = layers[0]
    routed = RoutedInputs(adapter, layer, max_rows=10**6)
    handle = model.get_submodule(layer.experts_path).register_forward_pre_hook(routed)
    with torch.no_grad():
        model(input_ids=tokens(8, 32))
    handle.remove()
    order = list(range(layer.num_experts))
    runs = {
        options: layer_damage(layer, routed, (3, 2), spec, order, "gptq", min_tokens=1, options=options)[0]
        for options in (GPTQOptions(), GPTQOptions(damp=0.5), GPTQOptions(act_order=True))
    }
    default, damped, ordered = runs.values()
    assert default != damped and default != ordered
    again = layer_damage(layer, routed, (3, 2), spec, order, "gptq", min_tokens=1)[0]
    assert again == default  # the default settings are the runner's defaults, and deterministic


def test_probes_cost_the_same_whatever_the_calibration_sequence_length() -> None:
    """The probes take the first 16 x 256 tokens as windows of 256: GPTQ's 2048-token sequences
    made every probe 8x dearer (the largest cost of `auto` + GPTQ, 119 of 264 s)."""
    long = torch.arange(64 * 2048).view(64, 2048)
    assert probe_ids(long).shape == (16, 256) and torch.equal(probe_ids(long).reshape(-1), long.reshape(-1)[:4096])
    short = torch.arange(40 * 256).view(40, 256)
    assert torch.equal(probe_ids(short), short[:16])  # the allocate command's slice: as before
    tiny = torch.arange(8 * 32).view(8, 32)
    assert torch.equal(probe_ids(tiny), tiny)
