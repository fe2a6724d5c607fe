"""compressed-tensors export (vLLM's format), proven by readers moeq did not write: the
compressed-tensors library's own decompression (every tensor, exactly) and transformers'
``from_pretrained`` of the folder (logits as moeq runs the checkpoint)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.demo import DEFAULT_MODEL
from moeq.export import export_compressed
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from moeq.plan import ExpertEntry, TensorSpec
from tests.conftest import one_line_error

pytest.importorskip("compressed_tensors")
runner = CliRunner()
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantized(tmp_path: Path, family: str, plan_of) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", plan_of(model))
    return tmp_path / "q", model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


# Group sizes vLLM runs that divide the tiny models' widths (48-wide experts take one scale per channel).
FAMILIES = [("mixtral", 32), ("qwen2_moe", None), ("qwen3_moe", None), ("olmoe", None), ("deepseek_v3", 32)]


@pytest.mark.parametrize("family,group", FAMILIES)
def test_transformers_loads_the_export_as_moeq_runs_the_checkpoint(tmp_path: Path, family: str, group) -> None:
    import transformers

    checkpoint, _ = _quantized(tmp_path, family, lambda m: uniform_plan(m, QuantConfig(bits=4, scheme="sym", group_size=group, attn_bits=8)))
    report = export_compressed(checkpoint, tmp_path / "ct")
    assert report.transformers_note is None
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert type(served.config.quantization_config).__name__ == "CompressedTensorsConfig"
    # float32 models: every dequantized weight is exact, the sums differ only in order (measured <= 2e-7)
    assert torch.allclose(_logits(served), _logits(moeq.load(checkpoint)), atol=1e-5, rtol=0)


def _group_of(config: dict, name: str) -> dict:
    for group in config["quantization_config"]["config_groups"].values():
        for target in group["targets"]:
            if (target.startswith("re:") and re.match(target[3:], name)) or target == name:
                return group
    raise AssertionError(f"no config group names {name}")


def _per_layer_plan(model):
    """Layer 0 at W8A16 sym, the others at W4A16 asym, groups of 32; attention at W8 sym."""
    plan = uniform_plan(model, QuantConfig(bits=4, scheme="asym", group_size=32, attn_bits=8))
    plan.linears = {name: TensorSpec(8, "sym", 32) for name in plan.linears}
    plan.experts = [ExpertEntry(e.layer, e.expert, e.projection, TensorSpec(8, "sym", 32) if e.layer == 0 else e.spec)
                    for e in plan.experts]
    return plan


def test_compressed_tensors_decompresses_every_tensor_to_moeqs_weights(tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    checkpoint, _ = _quantized(tmp_path, "mixtral", _per_layer_plan)
    report = export_compressed(checkpoint, tmp_path / "ct")
    assert sorted(report.groups.values()) == ["W4A16 asym g32", "W8A16 sym g32"]
    assert "different schemes" in report.transformers_note
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    QuantizationConfig.model_validate(config["quantization_config"])  # the library's own schema
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    loaded = moeq.load(checkpoint)
    modules = dict(loaded.named_modules())
    _, layers = moe_layers_or_error(loaded)
    checked = 0
    for layer in layers:
        for expert in range(layer.num_experts):
            for projection, disk in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                name = f"{layer.path.replace('.mlp', '.block_sparse_moe')}.experts.{expert}.{disk}"
                ours = modules[layer.experts_path].expert(expert)[projection].quantized
                scheme = QuantizationScheme.model_validate(_group_of(config, name))
                assert scheme.weights.num_bits == ours.bits and scheme.weights.symmetric == (ours.zeros is None)
                state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
                theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
                assert torch.equal(theirs.float(), ours.dequantize(torch.float32)), name  # bit for bit
                checked += 1
    for name in moeq.read_plan(checkpoint).linears:
        state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
        theirs = PackedQuantizationCompressor.decompress(state, QuantizationScheme.model_validate(_group_of(config, name)))["weight"]
        assert torch.equal(theirs.float(), modules[name].quantized.dequantize(torch.float32)), name
        checked += 1
    assert checked == sum(3 * layer.num_experts for layer in layers) + len(moeq.read_plan(checkpoint).linears)
    assert "model.layers.0.block_sparse_moe.gate" in config["quantization_config"]["ignore"]  # routers stay unquantized


def test_the_vllm_target_plans_what_the_export_writes_byte_for_byte(tmp_path: Path) -> None:
    """On the bf16 default model: ``--target vllm`` plans one scheme per MoE layer, scales in the
    model's dtype (so vLLM holds them exactly), bytes as compressed-tensors stores them; the export
    holds exactly that, and transformers runs a uniform one as moeq does."""
    import transformers

    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["allocate", str(DEFAULT_MODEL), "--target", "vllm", "--strategy", "error-ilp", "--avg-bits", "6.2",
                                 "--group-size", "128", "--scheme", "sym", "--out", str(plan_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    plan = moeq.read_plan(plan_path) if plan_path.is_dir() else moeq.BitPlan.load(plan_path)
    assert plan.scale_dtype == "bfloat16" and plan.method["target"]["granularity"] == "layer"
    per_layer = {}
    for entry in plan.experts:
        per_layer.setdefault(entry.layer, set()).add((entry.spec.bits, entry.spec.scheme.value, entry.spec.group_size))
    assert all(len(specs) == 1 for specs in per_layer.values()) and {b for s in per_layer.values() for b, _, _ in s} == {4, 8}
    assert plan.budget["expert_bits_per_weight"] <= 6.2
    result = runner.invoke(app, ["quantize", str(DEFAULT_MODEL), "--out", str(tmp_path / "q"), "--plan", str(plan_path), "--target", "vllm"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")],
                           env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "vllm serve" in result.output and "different schemes" in result.output
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    expert_bytes = sum(t.nbytes for name, t in tensors.items() if ".experts." in name)
    assert expert_bytes == plan.budget["expert_bytes"]  # the budget counted the file's own bytes
    assert all(t.dtype == torch.bfloat16 for name, t in tensors.items() if name.endswith("weight_scale"))

    uniform = tmp_path / "u"
    result = runner.invoke(app, ["quantize", str(DEFAULT_MODEL), "--out", str(uniform), "--bits", "4", "--target", "vllm",
                                 "--scheme", "sym", "--group-size", "128", "--attn-bits", "8"])
    assert result.exit_code == 0, result.output
    report = export_compressed(uniform, tmp_path / "uct")
    assert report.transformers_note is None and sorted(report.groups.values()) == ["W4A16 sym g128", "W8A16 sym g128"]
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "uct")
    _logits(served)  # transformers decompresses the dense linears on the first forward
    # bf16 logits differ with the order of sums (this model's own bf16 and float32 logits differ by 0.95),
    # so the proof here is the weights: every tensor transformers holds is moeq's, bit for bit.
    assert _same_weights(served, moeq.load(uniform)) == len(served.state_dict())


def _same_weights(served, ours) -> int:
    """How many of ``served``'s tensors equal ``ours`` (moeq's dequantized weights in its dtype); fails on the first that differs."""
    modules = dict(ours.named_modules())
    _, layers = moe_layers_or_error(ours)
    expected = {}
    for layer in layers:
        experts = modules[layer.experts_path]
        weights = {p: torch.stack([experts.expert(e)[p].weight_for(torch.bfloat16) for e in range(layer.num_experts)])
                   for p in layer.projections}
        expected[f"{layer.experts_path}.gate_up_proj"] = torch.cat([weights["gate_proj"], weights["up_proj"]], dim=1)
        expected[f"{layer.experts_path}.down_proj"] = weights["down_proj"]
    for name, module in modules.items():
        if hasattr(module, "quantized") and not name.startswith(tuple(layer.experts_path for layer in layers)):
            expected[f"{name}.weight"] = module.quantized.dequantize(torch.float32).to(torch.bfloat16)
    own = ours.state_dict()
    count = 0
    for name, tensor in served.state_dict().items():
        if name.endswith(("weight_scale", "weight_shape", "weight_zero_point")):
            count += 1  # compressed-tensors' bookkeeping beside the decompressed weight
            continue
        reference = expected.get(name, own.get(name))
        assert reference is not None and torch.equal(tensor, reference), name
        count += 1
    return count


def _refused(args: list[str], match: str) -> None:
    line = one_line_error(runner.invoke(app, ["export", *args, "--format", "compressed-tensors"]))
    assert match in line, line


def test_plans_vllm_cannot_run_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    three, _ = _quantized(tmp_path / "a", "mixtral", lambda m: uniform_plan(m, QuantConfig(bits=3, scheme="sym", group_size=32)))
    _refused([str(three), "--out", str(tmp_path / "ct")], "is not a type vLLM (compressed-tensors) runs")

    def per_expert(model):
        plan = uniform_plan(model, QuantConfig(bits=4, scheme="sym", group_size=32))
        plan.experts = [ExpertEntry(e.layer, e.expert, e.projection, TensorSpec(8, "sym", 32) if e.expert == 0 else e.spec)
                        for e in plan.experts]
        return plan

    mixed, _ = _quantized(tmp_path / "b", "mixtral", per_expert)
    _refused([str(mixed), "--out", str(tmp_path / "ct")], "holds one type per layer; make the plan with --target vllm")
    eight_asym, _ = _quantized(tmp_path / "c", "mixtral", lambda m: uniform_plan(m, QuantConfig(bits=8, scheme="asym", group_size=32)))
    _refused([str(eight_asym), "--out", str(tmp_path / "ct")], "is not a type vLLM (compressed-tensors) runs")
    _refused([str(DEFAULT_MODEL), "--out", str(tmp_path / "ct")], "is not a moeq checkpoint")
    switch = tiny_model("switch_transformers")
    moeq.save(moeq.quantize(switch, QuantConfig(bits=4, scheme="sym", group_size=32)), tmp_path / "switch")
    _refused([str(tmp_path / "switch"), "--out", str(tmp_path / "ct")], "an encoder-decoder; vLLM's compressed-tensors MoE layers")
    assert not (tmp_path / "ct").exists()


def test_outputs_that_overlap_or_exist_are_refused(tmp_path: Path) -> None:
    checkpoint, _ = _quantized(tmp_path, "olmoe", lambda m: uniform_plan(m, QuantConfig(bits=4, scheme="sym")))
    _refused([str(checkpoint), "--out", str(checkpoint / "ct")], "lies inside the input")
    (tmp_path / "ct").mkdir()
    _refused([str(checkpoint), "--out", str(tmp_path / "ct")], "exists")
    result = runner.invoke(app, ["export", str(checkpoint), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ct" / "model.safetensors").is_file() and not list(tmp_path.glob(".ct.*"))


STRUCTURAL_FAMILIES = ["glm4_moe", "ernie4_5_moe", "minimax_m2", "phimoe", "hunyuan_v1_moe"]


def _structural(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, num_experts=4, n_routed_experts=4, num_local_experts=4,
                 num_experts_per_tok=2, head_dim=16, max_position_embeddings=64)
    for key, value in small.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", STRUCTURAL_FAMILIES)
def test_families_read_by_structure_export_under_their_checkpoint_names(model_type: str, tmp_path: Path) -> None:
    """The names transformers' conversion mapping merges (per-expert, renamed blocks) are what the
    export writes, so transformers reads the folder back as moeq runs the checkpoint."""
    import transformers

    model = _structural(model_type)
    model.save_pretrained(tmp_path / "src")
    moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", uniform_plan(model, QuantConfig(bits=4, scheme="sym")))
    report = export_compressed(tmp_path / "q", tmp_path / "ct")
    assert report.transformers_note is None
    saved = load_file(tmp_path / "src" / "model.safetensors")  # transformers' own on-disk names for the experts
    exported = load_file(tmp_path / "ct" / "model.safetensors")
    expert_weights = {k[: -len(".weight")] for k in saved if ".experts." in k and k.endswith(".weight")}
    assert expert_weights == {k[: -len(".weight_packed")] for k in exported if k.endswith(".weight_packed")}
    served = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids).logits, moeq.load(tmp_path / "q")(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_family_with_fused_experts_on_disk_is_refused(tmp_path: Path) -> None:
    model = _structural("granitemoe")  # its checkpoints hold one input_linear/output_linear tensor per layer
    model.save_pretrained(tmp_path / "src")
    moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", uniform_plan(model, QuantConfig(bits=4, scheme="sym")))
    _refused([str(tmp_path / "q"), "--out", str(tmp_path / "ct")], "whose checkpoints do not name one linear per expert")
    assert not (tmp_path / "ct").exists()
