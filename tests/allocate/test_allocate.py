"""moeq.allocate end to end on tiny models: every strategy, budgets, lazy reading, errors."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import moeq
from moeq.allocate import STRATEGIES, CountError, allocate, level_counts
from moeq.allocate.scores import max_var
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.plan import PlanError


@pytest.fixture
def mixtral_folder(tmp_path: Path) -> Path:
    tiny_model("mixtral").save_pretrained(tmp_path / "mixtral")
    return tmp_path / "mixtral"


def tokens(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def widths(plan) -> list[list[int]]:
    out = [[0] * 8 for _ in plan.layers]
    for e in plan.experts:
        out[e.layer][e.expert] = e.spec.bits
    return out


def test_router_maxvar_reads_only_routers_and_gate_projections(mixtral_folder: Path) -> None:
    plan = allocate(mixtral_folder, "router-maxvar", avg_bits=2.25)
    router_bytes = 2 * 8 * 64 * 4
    gate_bytes = 2 * 8 * 96 * 64 * 4  # fp32 tiny model: each expert's [96, 64] gate projection
    assert plan.method["bytes_read"] == router_bytes + gate_bytes
    assert allocate(mixtral_folder, "router", avg_bits=2.25).method["bytes_read"] == router_bytes
    for row in widths(plan):
        assert Counter(row) == Counter({b: n for b, n in level_counts(2.25, (3, 2, 1), 8).items() if n})


def test_scores_follow_the_paper(mixtral_folder: Path) -> None:
    model = tiny_model("mixtral")
    reference = tiny_model("mixtral", seed=7)
    plan = allocate(mixtral_folder, "router-maxvar", avg_bits=2.0, reference=reference)
    _, layers = moe_layers_or_error(model)
    _, ref_layers = moe_layers_or_error(reference)
    for layer, ref, change, maxvar in zip(layers, ref_layers, plan.scores["router_norm_change"], plan.scores["maxvar"]):
        expected = layer.router_weight.double().norm(dim=1) - ref.router_weight.double().norm(dim=1)
        assert np.allclose(change, expected.detach().numpy(), atol=1e-12)
        assert maxvar == pytest.approx([max_var(layer.expert_weight(e, "gate_proj")) for e in range(8)])
    assert "reference" in plan.method["router_signal"]
    proxy = allocate(mixtral_folder, "router-maxvar", avg_bits=2.0)
    assert "router_final_norm" in proxy.scores and "proxy" in proxy.method["router_signal"]


def test_most_protected_experts_get_the_most_bits(mixtral_folder: Path) -> None:
    plan = allocate(mixtral_folder, "router", avg_bits=2.5)
    for row, change in zip(widths(plan), plan.scores["router_final_norm"]):
        order = sorted(range(8), key=lambda e: (change[e], e))
        assert [row[e] for e in order] == sorted(row, reverse=True)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "switch_transformers", "olmoe", "qwen3_moe"])
def test_data_free_allocation_works_for_every_family(family: str, tmp_path: Path) -> None:
    tiny_model(family).save_pretrained(tmp_path / family)
    plan = allocate(tmp_path / family, "router-maxvar", avg_bits=2.5)
    assert plan.budget["avg_expert_bits"] == pytest.approx(2.5)
    model = moeq.quantize(tiny_model(family), plan)
    assert model.config.quantization_config.bit_plan().to_json()["experts"] == plan.to_json()["experts"]


def test_every_strategy_meets_the_average(mixtral_folder: Path) -> None:
    model = tiny_model("mixtral")
    for strategy in STRATEGIES:
        avg = 2 if strategy == "uniform" else 2.5
        plan = allocate(model, strategy, avg_bits=avg, calibration=tokens())
        assert plan.budget["avg_expert_bits"] <= avg + 1e-9, strategy
        assert plan.method["strategy"] == strategy
        assert {e.spec.scheme.value for e in plan.experts if e.spec.bits == 1} <= {"sign"}
        if strategy not in ("pmq", "error-ilp", "auto"):
            assert plan.budget["avg_expert_bits"] == pytest.approx(avg), strategy


def test_random_is_seeded(mixtral_folder: Path) -> None:
    a = allocate(mixtral_folder, "random", avg_bits=2.25, seed=1)
    b = allocate(mixtral_folder, "random", avg_bits=2.25, seed=1)
    c = allocate(mixtral_folder, "random", avg_bits=2.25, seed=2)
    assert widths(a) == widths(b) != widths(c)


def test_frequency_counts_every_routed_slot() -> None:
    model = tiny_model("mixtral")
    plan = allocate(model, "frequency", avg_bits=2.5, calibration=tokens())
    frequency = np.array(plan.scores["frequency"])
    assert np.allclose(frequency.sum(axis=1), 2.0)  # top-2 routing: two slots per token
    for row, freq in zip(widths(plan), frequency):
        order = sorted(range(8), key=lambda e: (-freq[e], e))
        assert [row[e] for e in order] == sorted(row, reverse=True)


def test_pmq_keeps_its_constraints() -> None:
    plan = allocate(tiny_model("olmoe"), "pmq", avg_bits=1.5, calibration=tokens())
    for row in widths(plan):
        assert 3 in row and 2 in row and sum(row) <= 1.5 * 8


def test_error_ilp_beats_every_count_rule_on_its_own_objective() -> None:
    model = tiny_model("qwen3_moe")
    best = allocate(model, "error-ilp", avg_bits=2.25)
    table = best.scores["error"]

    def total_error(plan) -> float:
        return sum(table[str(b)][layer][expert] for layer, row in enumerate(widths(plan)) for expert, b in enumerate(row))

    for strategy in ("router-maxvar", "router", "variance", "random"):
        assert total_error(best) <= total_error(allocate(model, strategy, avg_bits=2.25)) + 1e-9


def test_weighted_error_uses_calibration() -> None:
    model = tiny_model("mixtral")
    plain = allocate(model, "error-ilp", avg_bits=2.5)
    weighted = allocate(model, "error-ilp", avg_bits=2.5, calibration=tokens(), weighted_error=True)
    assert plain.scores["error"] != weighted.scores["error"] and "weighted" in weighted.method["error"]


def test_byte_budgets(mixtral_folder: Path) -> None:
    low = allocate(mixtral_folder, "uniform", avg_bits=1).budget["model_bytes"]
    budget = allocate(mixtral_folder, "uniform", avg_bits=2).budget["model_bytes"]
    assert allocate(mixtral_folder, "uniform", max_bytes=budget).budget["avg_expert_bits"] == 2.0
    assert allocate(mixtral_folder, "uniform", max_bytes=budget - 1).budget["avg_expert_bits"] == 1.0
    for strategy in ("router-maxvar", "error-ilp"):
        plan = allocate(mixtral_folder, strategy, max_bytes=budget)
        assert plan.budget["model_bytes"] <= budget
        assert plan.budget["avg_expert_bits"] >= 2.0  # 1-bit sign experts carry no zero points
    with pytest.raises(CountError, match="impossible: the smallest plan at 1 bits takes"):
        allocate(mixtral_folder, "router-maxvar", max_bytes=low - 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"strategy": "greedy", "avg_bits": 2.5}, PlanError, "unknown strategy 'greedy'"),
        ({"strategy": "router"}, PlanError, "give exactly one budget"),
        ({"strategy": "router", "avg_bits": 2.5, "max_bytes": 10}, PlanError, "give exactly one budget"),
        ({"strategy": "router", "avg_bits": 3.5}, CountError, "outside the levels"),
        ({"strategy": "router", "avg_bits": 2.0, "levels": (4, 2, 1)}, CountError, "equally spaced"),
        ({"strategy": "uniform", "avg_bits": 2.5}, CountError, "whole number of bits"),
        ({"strategy": "frequency", "avg_bits": 2.5}, PlanError, "needs calibration text"),
    ],
)
def test_bad_requests_are_named(mixtral_folder: Path, kwargs, error, message) -> None:
    strategy = kwargs.pop("strategy")
    with pytest.raises(error, match=message):
        allocate(mixtral_folder, strategy, **kwargs)


def test_initial_routers_file_is_used_as_the_reference(mixtral_folder: Path) -> None:
    from safetensors.torch import save_file

    initial = tiny_model("mixtral", seed=9)
    routers = {f"model.layers.{i}.mlp.gate.weight": initial.model.layers[i].mlp.gate.weight.detach().clone() for i in (0, 1)}
    save_file(routers, mixtral_folder / "initial_router.safetensors")
    plan = allocate(mixtral_folder, "router", avg_bits=2.5)
    explicit = allocate(mixtral_folder, "router", avg_bits=2.5, reference=initial)
    assert "router_norm_change" in plan.scores and "initial_router.safetensors" in plan.method["router_signal"]
    assert plan.scores["router_norm_change"] == explicit.scores["router_norm_change"]
    assert any(abs(v) > 1e-4 for row in plan.scores["router_norm_change"] for v in row)


def test_calibrated_allocation_keeps_tied_weights_counted_once(tmp_path: Path) -> None:
    from moeq.models.tiny import tiny_config
    import transformers

    config = tiny_config("mixtral")
    config.tie_word_embeddings = True
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    data_free = allocate(tmp_path / "tied", "router", avg_bits=2.5)
    calibrated = allocate(tmp_path / "tied", "frequency", avg_bits=2.5, calibration=tokens())
    assert calibrated.budget["model_bytes"] == data_free.budget["model_bytes"]


def test_every_ranking_strategy_is_one_registered_rule() -> None:
    from moeq.allocate.api import ORDER_RULES, ORDER_STRATEGIES

    assert tuple(ORDER_RULES) == ORDER_STRATEGIES


def test_uniform_under_a_byte_budget_takes_the_largest_whole_width_whatever_the_levels() -> None:
    from moeq.demo import DEFAULT_MODEL

    plan = moeq.allocate(DEFAULT_MODEL, "uniform", max_bytes=16_000_000)  # default levels 3,2,1 do not bound it
    assert {e.spec.bits for e in plan.experts} == {8} and plan.budget["model_bytes"] <= 16_000_000
