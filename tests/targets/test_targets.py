"""Targets as data: the GGUF target's types are llama.cpp's (sizes from the gguf package), plans
made for it hold one type per (layer, projection), budgets count the file's true bytes, and a
plan it cannot hold is refused in one line."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.demo import DEFAULT_MODEL
from moeq.export import export_gguf
from moeq.io.source import load_source
from moeq.plan import PlanError, TensorSpec
from moeq.targets import TARGETS, get_target
from tests.conftest import one_line_error

runner = CliRunner()
GGUF = TARGETS["gguf"]


@pytest.mark.parametrize("kind", sorted({k for kinds in (*GGUF.levels.values(), GGUF.held) for k in kinds}, key=lambda k: k.name),
                         ids=lambda k: k.name)
def test_every_gguf_type_has_llama_cpps_size(kind) -> None:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.name]]
    shape = (3, 768)
    assert kind.nbytes(shape) == 3 * 768 // block * size


def test_rows_no_k_quant_divides_fall_back_as_llama_cpp_does() -> None:
    assert [GGUF.type_at(b, 256).name for b in (2, 3, 4, 5, 6, 8)] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert [GGUF.type_at(b, 384).name for b in (2, 3, 4, 5, 6, 8)] == ["Q4_0", "Q4_0", "Q4_0", "Q5_0", "Q8_0", "Q8_0"]
    assert GGUF.type_at(1, 384).name == "Q1_0" and GGUF.type_at(1, 384).bits_per_weight((2, 384)) == 1.125
    with pytest.raises(PlanError, match=r"target gguf has no 1-bit type for rows of 320 \(tried Q1_0\)"):
        GGUF.type_at(1, 320)  # Q1_0's blocks are 128 long, and llama.cpp has no other 1-bit type to fall back to
    with pytest.raises(PlanError, match="no 7-bit level"):
        GGUF.type_at(7, 256)
    with pytest.raises(PlanError, match="unknown target 'onnx'; choose one of: moeq, gguf"):
        get_target("onnx")


def _stacks(plan) -> dict[tuple[int, str], set]:
    rows: dict[tuple[int, str], set] = {}
    for entry in plan.experts:
        rows.setdefault((entry.layer, entry.projection), set()).add(entry.spec)
    return rows


@pytest.mark.parametrize("strategy", ["router-maxvar", "variance", "random", "uniform", "error-ilp", "pmq"])
def test_every_strategy_plans_within_the_target_and_its_budget_is_the_files(strategy: str, tmp_path: Path) -> None:
    avg = 4 if strategy == "uniform" else 3.5
    calibration = {"calibration": "default", "calib_tokens": 2048} if strategy == "pmq" else {}
    plan = moeq.allocate(DEFAULT_MODEL, strategy, avg_bits=avg, target="gguf", **calibration)
    assert all(len(specs) == 1 for specs in _stacks(plan).values())  # one type per expert stack
    source = load_source(DEFAULT_MODEL)
    checkpoint = tmp_path / "q"
    moeq.save(moeq.quantize(source, plan), checkpoint, source=DEFAULT_MODEL)
    report = export_gguf(checkpoint, tmp_path / "m.gguf")  # the exporter measures the file it wrote
    assert report.expert_bits_per_weight == pytest.approx(plan.budget["expert_bits_per_weight"])
    if strategy == "uniform":
        assert set(report.type_counts()) >= {"Q4_K", "Q4_0"}  # gate/up Q4_K; down (384 inputs) Q4_0
    else:
        assert plan.budget["expert_bits_per_weight"] <= avg
        assert plan.method["target"]["name"] == "gguf"
        assert ("levels" if strategy == "error-ilp" else "widening") in plan.method["target"]


def test_a_one_bit_level_plans_q1_0_stacks(tmp_path: Path) -> None:
    plan = moeq.allocate(DEFAULT_MODEL, "router-maxvar", avg_bits=2.5, target="gguf", levels=(3, 2, 1))
    moeq.save(moeq.quantize(load_source(DEFAULT_MODEL), plan), tmp_path / "q", source=DEFAULT_MODEL)
    report = export_gguf(tmp_path / "q", tmp_path / "m.gguf")
    assert report.type_counts()["Q1_0"] >= 1 and report.expert_bits_per_weight == plan.budget["expert_bits_per_weight"] <= 2.5


def test_auto_chooses_per_layer_and_projection_and_beats_every_uniform_plan_it_could_have_made() -> None:
    plan = moeq.allocate(DEFAULT_MODEL, "auto", avg_bits=3.6, target="gguf", calibration="default", calib_tokens=4096)
    assert all(len(specs) == 1 for specs in _stacks(plan).values())
    assert plan.budget["expert_bits_per_weight"] <= 3.6
    from moeq.allocate.damage import DamageTable

    table = DamageTable.from_json(plan.scores["predicted_damage"])
    layers = len(plan.layers)
    chosen = plan.budget["predicted_damage"]
    for bits in table.widths:  # every uniform plan within the budget predicts more damage (the ILP's optimum)
        uniform = moeq.allocate(DEFAULT_MODEL, "uniform", avg_bits=bits, target="gguf")
        if uniform.budget["expert_bits_per_weight"] <= 3.6:
            assert table.tensor_total({(i, p): bits for i in range(layers) for p in range(3)}) >= chosen
    assert plan.budget["predicted_damage_with_a_width_per_expert"] > 0


def test_a_plan_the_target_cannot_hold_is_refused_naming_the_rule() -> None:
    source = load_source(DEFAULT_MODEL)
    from moeq.models import moe_layers_or_error

    shapes = [layer.shapes for layer in moe_layers_or_error(source)[1]]
    free = moeq.allocate(DEFAULT_MODEL, "router-maxvar", avg_bits=2.5)  # moeq's own: asym, a width per expert
    with pytest.raises(PlanError, match=r"3-bit asym is not a type llama.cpp \(GGUF\) runs .* make the plan with --target gguf"):
        GGUF.check_plan(free, shapes)
    plan = moeq.allocate(DEFAULT_MODEL, "uniform", avg_bits=4, target="gguf")
    for entry in plan.experts:
        if entry.layer == 2 and entry.projection == "up_proj" and entry.expert == 5:
            object.__setattr__(entry, "spec", TensorSpec(5, "q5_k"))
    with pytest.raises(PlanError, match="layer 2 up_proj: its experts use 4-bit q4_k, 5-bit q5_k, but llama.cpp \\(GGUF\\) holds one type per"):
        GGUF.check_plan(plan, shapes)
    TARGETS["moeq"].check_plan(plan, shapes)  # moeq's own runtime holds anything


def test_cli_quantizes_for_gguf_and_refuses_a_plan_it_cannot_hold(tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(DEFAULT_MODEL), "--out", str(out), "--bits", "3", "--target", "gguf"])
    assert result.exit_code == 0, result.output
    report = export_gguf(out, tmp_path / "m.gguf")
    assert report.type_counts()["Q3_K"] == 8 and report.type_counts()["Q4_0"] == 4
    plan = tmp_path / "plan.json"
    assert runner.invoke(app, ["allocate", str(DEFAULT_MODEL), "--out", str(plan), "--avg-bits", "2.5"]).exit_code == 0
    line = one_line_error(runner.invoke(app, ["quantize", str(DEFAULT_MODEL), "--out", str(tmp_path / "r"), "--plan", str(plan),
                                              "--target", "gguf"]))
    assert "make the plan with --target gguf" in line and not (tmp_path / "r").exists()
    line = one_line_error(runner.invoke(app, ["allocate", str(DEFAULT_MODEL), "--out", str(tmp_path / "p2.json"), "--avg-bits",
                                              "3", "--target", "gguf", "--levels", "7,5,3"]))
    assert "--target gguf has levels 8,6,5,4,3,2,1; 7 is not one of them" in line


def _layer_specs(plan) -> dict[int, set]:
    out: dict[int, set] = {}
    for entry in plan.experts:
        out.setdefault(entry.layer, set()).add((entry.spec.bits, entry.spec.scheme.value, entry.spec.group_size))
    return out


def test_the_vllm_target_sizes_are_compressed_tensors_own() -> None:
    """Bytes of one weight as compressed-tensors packs it (its own pack_to_int32 on the real shapes)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for scheme, bits, group in (("sym", 4, 128), ("asym", 4, 32), ("sym", 8, None), ("asym", 4, None)):
        kind = get_target("vllm", scheme, group).type_at(bits, 384)
        rows, cols = 96, 384
        groups = cols // (group or cols)
        packed = pack_to_int32(torch.zeros(rows, cols, dtype=torch.int8), bits).nbytes
        zeros = pack_to_int32(torch.zeros(rows, groups, dtype=torch.int8), bits, packed_dim=0).nbytes if scheme == "asym" else 0
        assert kind.nbytes((rows, cols)) == packed + rows * groups * 2 + zeros + 16, kind.name


@pytest.mark.parametrize("strategy", ["router-maxvar", "uniform", "error-ilp", "auto"])
def test_every_strategy_plans_one_vllm_scheme_per_moe_layer(strategy: str) -> None:
    avg = 4 if strategy == "uniform" else 6.2
    calibration = {"calibration": "default", "calib_tokens": 2048} if strategy == "auto" else {}
    plan = moeq.allocate(DEFAULT_MODEL, strategy, avg_bits=avg, target="vllm", scheme="asym", group_size=64, **calibration)
    per_layer = _layer_specs(plan)
    assert all(len(specs) == 1 for specs in per_layer.values())  # vLLM reads one scheme per fused MoE layer
    assert {s for specs in per_layer.values() for s in specs} <= {(4, "asym", 64), (8, "sym", 64)}  # no 8-bit asym kernel
    assert plan.scale_dtype == "bfloat16"  # vLLM holds scales in the model's dtype
    if strategy != "uniform":  # uniform at 4 is the 4-bit level (4.31 bits per weight with g64 scales)
        assert plan.budget["expert_bits_per_weight"] <= avg
    if strategy in ("error-ilp", "auto"):
        assert {b for specs in per_layer.values() for b, _, _ in specs} == {4, 8}  # 6.2 bits buys some layers at 8
    if strategy == "auto":  # what one scheme per layer costs against a width per expert at the same bytes
        assert 0 < plan.budget["predicted_damage_with_a_width_per_expert"] <= plan.budget["predicted_damage"]


def test_the_vllm_target_refuses_what_its_kernels_do_not_take() -> None:
    with pytest.raises(PlanError, match="--target vllm quantizes with --scheme sym or asym"):
        moeq.allocate(DEFAULT_MODEL, "uniform", avg_bits=4, target="vllm", scheme="log")
    with pytest.raises(PlanError, match="--target vllm takes --group-size 32, 64 or 128"):
        moeq.allocate(DEFAULT_MODEL, "uniform", avg_bits=4, target="vllm", group_size=16)
    with pytest.raises(PlanError, match="--target vllm has levels 8,4; 3 is not one of them"):
        moeq.allocate(DEFAULT_MODEL, "router-maxvar", avg_bits=3.5, target="vllm", levels=(4, 3))
    free = moeq.allocate(DEFAULT_MODEL, "router-maxvar", avg_bits=2.5)
    source = load_source(DEFAULT_MODEL)
    from moeq.models import moe_layers_or_error

    shapes = [layer.shapes for layer in moe_layers_or_error(source)[1]]
    with pytest.raises(PlanError, match=r"is not a type vLLM \(compressed-tensors\) runs .* make the plan with --target vllm"):
        TARGETS["vllm"].check_plan(free, shapes)
