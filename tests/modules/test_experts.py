"""QuantizedExperts computes what the family's own experts module computes on dequantized weights."""

import copy
import random

import pytest
import torch

from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.modules.convert import quantize_model, rtn_quantizer
from moeq.modules.linear import QuantizedLinear
from moeq.plan import BitPlan, ExpertEntry, PlanError, TensorSpec

# float32 throughout; the two paths sum the same products in different orders.
ATOL = 1e-5

SPECS = [
    TensorSpec(1, "sign"), TensorSpec(2, "asym"), TensorSpec(3, "asym", 16), TensorSpec(3, "log"),
    TensorSpec(4, "sym", clip_search=True), TensorSpec(5, "asym"), TensorSpec(8, "sym"),
]


def mixed_plan(model, seed: int = 0) -> BitPlan:
    """Every expert projection gets its own randomly chosen width and scheme."""
    rng = random.Random(seed)
    _, layers = moe_layers_or_error(model)
    entries = [
        ExpertEntry(layer.index, e, p, rng.choice(SPECS))
        for layer in layers for e in range(layer.num_experts) for p in layer.projections
    ]
    return BitPlan(model.config.model_type, [layer.path for layer in layers], entries)


def dequantized_copy(model, quantized_model, plan: BitPlan):
    """The original model with every planned expert weight replaced by its dequantized value."""
    reference = copy.deepcopy(model)
    _, layers = moe_layers_or_error(reference)
    with torch.no_grad():
        for layer in layers:
            experts = quantized_model.get_submodule(layer.experts_path)
            for (e, p), weight in layer.expert_weights().items():
                weight.copy_(experts.expert(e)[p].weight_for(torch.float32))
    return reference


def test_mixed_widths_in_one_layer_match_the_reference_forward(family: str) -> None:
    from tests.conftest import logits

    model = tiny_model(family)
    plan = mixed_plan(model)
    quantized = quantize_model(copy.deepcopy(model), plan)
    reference = dequantized_copy(model, quantized, plan)
    widths = {e.spec.bits for e in plan.experts if e.layer == 0}
    assert len(widths) >= 4, "the test must mix widths inside one layer"
    torch.testing.assert_close(logits(quantized), logits(reference), atol=ATOL, rtol=0)


def test_experts_receive_the_weights_the_quantizer_produced() -> None:
    model = tiny_model("olmoe")
    plan = mixed_plan(model, seed=3)
    _, layers = moe_layers_or_error(model)
    originals = {(l.index, e, p): w.clone() for l in layers for (e, p), w in l.expert_weights().items()}
    quantized = quantize_model(model, plan)
    for entry in plan.experts:
        linear: QuantizedLinear = quantized.get_submodule(layers[entry.layer].experts_path).expert(entry.expert)[entry.projection]
        expected = rtn_quantizer(originals[(entry.layer, entry.expert, entry.projection)], entry.spec, torch.float16)
        assert torch.equal(linear.codes, expected.codes) and torch.equal(linear.scales, expected.scales)
        assert linear.spec == entry.spec


def test_sentinel_indices_and_unrouted_experts_contribute_nothing() -> None:
    model = tiny_model("mixtral")
    quantized = quantize_model(model, mixed_plan(model))
    experts = quantized.model.layers[0].mlp.experts
    hidden = torch.randn(5, 64)
    index = torch.tensor([[0, 8], [8, 8], [3, 1], [3, 8], [7, 0]])  # 8 = sentinel (num_experts)
    weights = torch.rand(5, 2)
    out = experts(hidden, index, weights)
    assert torch.equal(out[1], torch.zeros(64))
    alone = experts(hidden[:1], torch.tensor([[0]]), weights[:1, :1])
    torch.testing.assert_close(out[:1], alone, atol=ATOL, rtol=0)


def test_a_layer_with_some_experts_unplanned_is_refused() -> None:
    model = tiny_model("mixtral")
    plan = mixed_plan(model)
    plan.experts = [e for e in plan.experts if not (e.layer == 0 and e.expert == 5)]
    with pytest.raises(PlanError, match="leaves 3 expert projections of this layer unplanned"):
        quantize_model(model, plan)
