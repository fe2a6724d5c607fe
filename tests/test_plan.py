"""BitPlan: JSON round trip, validation with named errors, uniform plans and their budgets."""

import json
from pathlib import Path

import pytest

import moeq
from moeq.config import QuantConfig, uniform_plan
from moeq.models.tiny import tiny_model
from moeq.modules.convert import validate_plan
from moeq.plan import BitPlan, ExpertEntry, PlanError, TensorSpec


def test_json_round_trip(tmp_path: Path) -> None:
    plan = uniform_plan(tiny_model("deepseek_v3"), QuantConfig(bits=3, attn_bits=4, group_size=16, clip_search=True))
    plan.save(tmp_path / "plan.json")
    again = BitPlan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert again.experts[0].spec == TensorSpec(3, "asym", 16, True)


def test_rows_are_compact_and_expand_to_the_same_plan() -> None:
    model = tiny_model("mixtral")
    plan = uniform_plan(model, QuantConfig(bits=3))
    for entry in plan.experts[::5]:
        object.__setattr__(entry, "spec", TensorSpec(2, "sym", 32))
    rows = plan.to_json()["experts"]
    assert len(rows) == 2 * 3  # one row per (layer, projection)
    assert any(isinstance(row["bits"], list) for row in rows) and rows[0]["clip_search"] is False
    again = BitPlan.from_json(plan.to_json())
    as_set = lambda p: {(e.layer, e.expert, e.projection, e.spec) for e in p.experts}  # noqa: E731
    assert as_set(again) == as_set(plan)


def test_uniform_plan_budget_matches_theory() -> None:
    model = tiny_model("mixtral")  # 2 layers x 8 experts x (gate, up [96, 64] + down [64, 96]), fp32
    plan = uniform_plan(model, QuantConfig(bits=3))
    per_projection = (96 * 64 * 3 + 7) // 8 + 96 * 2 + 96  # codes + fp16 scale + uint8 zero per row
    per_down = (64 * 96 * 3 + 7) // 8 + 64 * 2 + 64
    assert plan.budget["avg_expert_bits"] == 3.0
    assert plan.budget["expert_bytes"] == 16 * (2 * per_projection + per_down)
    assert plan.budget["expert_bytes_full_precision"] == 16 * 3 * 96 * 64 * 4
    assert len(plan.experts) == 2 * 8 * 3 and plan.linears == {}


def test_selective_roles_only_touch_what_was_asked() -> None:
    model = tiny_model("qwen2_moe")
    plan = uniform_plan(model, QuantConfig(bits=2, shared_bits=4))
    assert plan.linears and all("shared_expert." in name for name in plan.linears)
    plan = uniform_plan(model, QuantConfig(bits=2, attn_bits=8, lm_head_bits=8))
    assert "lm_head" in plan.linears and all("self_attn" in n or n == "lm_head" for n in plan.linears)


def test_sign_scheme_applies_to_one_bit_only() -> None:
    plan = uniform_plan(tiny_model("olmoe"), QuantConfig(bits=1, scheme="sign", attn_bits=4))
    assert {e.spec.scheme.value for e in plan.experts} == {"sign"}
    assert {s.scheme.value for s in plan.linears.values()} == {"asym"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other"), "not a moeq bit plan"),
        (lambda d: d.update(version=7), "version 7 is not supported"),
        (lambda d: d.pop("layers"), "lacks the required key 'layers'"),
        (lambda d: d["experts"][0].update(bits=9), r"experts\[0\] expert 0: scheme 'asym' takes 1 to 8 bits"),
        (lambda d: d["experts"][0].update(scheme="nf4"), "unknown quantization scheme 'nf4'"),
        (lambda d: d["experts"][0].update(layer=5), "names layer 5, the plan has 2 MoE layers"),
        (lambda d: d["experts"].append(dict(d["experts"][0])), "listed twice"),
        (lambda d: d["experts"][0].update(group_size=0), "group_size must be a positive integer"),
        (lambda d: d["experts"][0].pop("experts"), "needs an integer layer, a projection name and a list"),
        (lambda d: d["experts"][0].update(bits=[3, 2]), "bits lists 2 values for 8 experts"),
        (lambda d: d["experts"][0].update(colour="red"), "unknown keys"),
    ],
)
def test_malformed_plans_are_named(mutate, message) -> None:
    data = uniform_plan(tiny_model("mixtral"), QuantConfig(bits=3)).to_json()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        BitPlan.from_json(json.loads(json.dumps(data)))


def test_plans_that_do_not_fit_the_model_are_named() -> None:
    model = tiny_model("mixtral")
    plan = uniform_plan(tiny_model("olmoe"), QuantConfig(bits=3))
    with pytest.raises(PlanError, match="the plan is for a olmoe model, this model is mixtral"):
        validate_plan(model, plan)
    plan = uniform_plan(model, QuantConfig(bits=3))
    plan.experts.append(ExpertEntry(0, 0, "w1", TensorSpec(3)))
    with pytest.raises(PlanError, match="names projection 'w1'; layer 0 has gate_proj, up_proj, down_proj"):
        validate_plan(model, plan)
    plan = uniform_plan(model, QuantConfig(bits=3))
    plan.linears["model.layers.0.mlp.gate"] = TensorSpec(4)
    with pytest.raises(PlanError, match="not a linear layer outside the experts"):
        validate_plan(model, plan)


def test_group_size_must_divide_the_input_dimension() -> None:
    with pytest.raises(ValueError, match="group size 7 does not divide the input dimension 64"):
        uniform_plan(tiny_model("mixtral"), QuantConfig(bits=3, group_size=7))


@pytest.mark.parametrize("bits", [0, 9, 12])
def test_impossible_widths_are_refused(bits: int) -> None:
    with pytest.raises(PlanError, match="--bits must be 1 to 8"):
        uniform_plan(tiny_model("mixtral"), QuantConfig(bits=bits))


def test_missing_or_broken_plan_files(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="does not exist"):
        BitPlan.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        BitPlan.load(tmp_path / "bad.json")


def test_public_api_names() -> None:
    assert {"quantize", "load", "save", "BitPlan", "QuantConfig"} <= set(moeq.__all__)
