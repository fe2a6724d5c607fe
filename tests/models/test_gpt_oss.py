"""gpt-oss: experts with biases, gate and up rows interleaved, stored transposed, its own clamped
SwiGLU, and its release format, MXFP4 experts. The tiny model gets random biases (transformers
initialises them to zero, which would hide a bias moeq dropped)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import moeq
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.io.checkpoint import CheckpointError
from moeq.io.lazy import open_lazy
from moeq.io.source import load_source
from moeq.models import auto_model_class, moe_layers_or_error
from moeq.kernels import moe_experts_forward
from moeq.modules.experts import QuantizedExperts, use_backend
from moeq.quant.sources import E2M1_VALUES
from tests.conftest import one_line_error
from tests.models.families import tiny_config

runner = CliRunner()
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = tiny_config("gpt_oss")
    config.swiglu_limit = 0.5  # low enough that the clamps act on the tiny model's activations
    torch.manual_seed(0)
    built = auto_model_class(config).from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in built.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
            elif name.endswith(("gate_up_proj", "down_proj")):
                parameter.mul_(8)  # activations large enough to reach the clamps
    return built


def test_the_quantized_layer_is_the_models_own_computation(model) -> None:
    _, layers = moe_layers_or_error(model)
    layer = layers[0]
    assert layer.interleaved and layer.transposed and layer.expert_bias is not None
    experts = model.get_submodule(layer.experts_path)
    # gate is gate_up_proj's even columns, up its odd ones (stored [E, H, 2I])
    assert torch.equal(layer.expert_weight(1, "gate_proj"), experts.gate_up_proj[1][:, 0::2].T)
    assert torch.equal(layer.expert_weight(1, "up_proj"), experts.gate_up_proj[1][:, 1::2].T)
    assert torch.equal(layer.bias(1, "up_proj"), experts.gate_up_proj_bias[1, 1::2])
    reference = _logits(model)
    quantized = moeq.quantize(copy.deepcopy(model), uniform_plan(model, QuantConfig(bits=8)))
    ours = _logits(quantized)
    # 8-bit experts: close to the model; the same layer with its biases dropped is far from it
    assert (ours - reference).abs().max() <= 0.02 * reference.abs().max()
    unbiased = copy.deepcopy(quantized)
    for module in unbiased.modules():
        if isinstance(module, QuantizedExperts):
            assert module.biased
            for e in range(module.num_experts):
                for p in module.projections:
                    module.expert(e)[p].bias.data.zero_()
    assert (_logits(unbiased) - reference).abs().max() >= 10 * (ours - reference).abs().max()
    # the model's own experts module given the dequantized weights and biases computes the same
    dense = copy.deepcopy(model)
    adapter, packed_layers = moe_layers_or_error(quantized)
    for packed in packed_layers:
        adapter.fill_experts(dense.get_submodule(packed.experts_path), packed)
    torch.testing.assert_close(_logits(dense), ours, atol=1e-4, rtol=1e-4)


def test_the_cpu_backends_add_the_biases_as_the_reference_does(model) -> None:
    quantized = moeq.quantize(copy.deepcopy(model), uniform_plan(model, QuantConfig(bits=4, group_size=32)))
    outputs = {}
    for backend in ("reference", "cpu", "cpu-int4"):
        use_backend(quantized, backend)
        outputs[backend] = _logits(quantized)
    torch.testing.assert_close(outputs["cpu"], outputs["reference"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs["cpu-int4"], outputs["reference"], atol=1e-3, rtol=1e-3)
    experts = next(m for m in quantized.modules() if isinstance(m, QuantizedExperts))
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="the triton kernels add no expert biases"):
        moe_experts_forward(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), experts, "triton")


def test_saved_streamed_and_calibrated_roads_keep_the_biases(model, tmp_path: Path) -> None:
    plan = uniform_plan(model, QuantConfig(bits=3))
    model.save_pretrained(tmp_path / "source")
    ours = _logits(moeq.quantize(copy.deepcopy(model), plan))
    moeq.quantize_checkpoint(tmp_path / "source", tmp_path / "streamed", plan)  # strided reads of gate_up_proj
    stored = {}
    for name in sorted((tmp_path / "streamed").glob("*.safetensors")):
        stored.update(load_file(name))
    experts = model.model.layers[0].mlp.experts
    assert torch.equal(stored["model.layers.0.mlp.experts.2.gate_proj.bias"], experts.gate_up_proj_bias[2, 0::2])
    assert torch.equal(stored["model.layers.0.mlp.experts.2.down_proj.bias"], experts.down_proj_bias[2])
    assert torch.equal(_logits(moeq.load(tmp_path / "streamed")), ours)
    from transformers import AutoModelForCausalLM

    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()), ours)
    reference = _logits(model)
    quantize_calibrated(tmp_path / "source", plan, IDS.repeat(4, 1), tmp_path / "gptq", CalibrationConfig(min_tokens=2))
    gptq = _logits(moeq.load(tmp_path / "gptq"))
    # on its calibration text GPTQ beats rounding (measured: 0.21x its squared logit error)
    assert (gptq - reference).pow(2).mean() <= 0.5 * (ours - reference).pow(2).mean()
    calibrated = moeq.load(tmp_path / "gptq").model.layers[1].mlp.experts.expert(3)
    assert torch.equal(calibrated["up_proj"].bias, model.model.layers[1].mlp.experts.gate_up_proj_bias[3, 1::2])
    auto = moeq.allocate(tmp_path / "source", "auto", avg_bits=3.0, calibration=IDS.repeat(4, 1))  # damage, with biases
    assert auto.budget["avg_expert_bits"] <= 3.0


def test_exports_refuse_gpt_oss_in_one_line(model, tmp_path: Path) -> None:
    moeq.save(moeq.quantize(copy.deepcopy(model), uniform_plan(model, QuantConfig(bits=4, group_size=32))), tmp_path / "q")
    for fmt in ("gguf", "compressed-tensors"):
        result = runner.invoke(app, ["export", str(tmp_path / "q"), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert "gpt_oss" in one_line_error(result)
        assert not (tmp_path / fmt).exists()


# -- MXFP4, gpt-oss's release format -------------------------------------------------------------

def _to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., rows, cols]`` floats as MXFP4 blocks ``[..., rows, cols/32, 16]`` and scales: each 32
    values share the power of two that puts their largest at most 6 (E2M1's largest), rounded to
    the nearest E2M1 value."""
    groups = weight.float().unflatten(-1, (-1, 32))
    exponent = torch.floor(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100))) - 2
    values = torch.tensor(E2M1_VALUES[:8])
    scaled = groups / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - values).abs().argmin(-1) + 8 * (scaled < 0)
    pairs = code.to(torch.uint8).unflatten(-1, (16, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4), (exponent + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def releases(model, tmp_path_factory) -> tuple[Path, Path]:
    """The model stored as gpt-oss is released (MXFP4 experts, bf16 elsewhere), and its twin with
    those experts dequantized by transformers and stored in bf16."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("mxfp4")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16.save_pretrained(root / "mxfp4")
    bf16.save_pretrained(root / "dense")
    tensors = load_file(root / "mxfp4" / "model.safetensors")
    packed, dense = {}, dict(tensors)
    for key, tensor in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _to_mxfp4(tensor.transpose(1, 2))  # stored [E, out, in / 32, 16]
            packed[f"{key}_blocks"], packed[f"{key}_scales"] = blocks, scales
            dense[key] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
        else:
            packed[key] = tensor
    save_file(packed, root / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, root / "dense" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                                         "model.embed_tokens", "lm_head"]}
    (root / "mxfp4" / "config.json").write_text(json.dumps(config))
    return root / "mxfp4", root / "dense"


def test_mxfp4_experts_read_as_transformers_dequantizes_them(releases) -> None:
    from transformers import AutoModelForCausalLM, Mxfp4Config

    mxfp4, _ = releases
    theirs = AutoModelForCausalLM.from_pretrained(mxfp4, quantization_config=Mxfp4Config(dequantize=True)).eval()
    lazy = open_lazy(mxfp4)
    for layer in lazy.layers:
        experts = theirs.get_submodule(layer.experts_path)
        for e in range(layer.num_experts):
            assert torch.equal(lazy.layers[layer.index].expert_weight(e, "gate_proj"), experts.gate_up_proj[e][:, 0::2].T)
            assert torch.equal(layer.expert_weight(e, "up_proj"), experts.gate_up_proj[e][:, 1::2].T)
            assert torch.equal(layer.expert_weight(e, "down_proj"), experts.down_proj[e].T)
    assert lazy.reader.bytes_read < sum(t.nbytes for t in load_file(mxfp4 / "model.safetensors").values())
    torch.testing.assert_close(_logits(load_source(mxfp4)), _logits(theirs), atol=0, rtol=0)  # eval, QAT read it so


def test_an_mxfp4_source_quantizes_to_the_bytes_of_its_dequantized_twin(releases, model, tmp_path: Path) -> None:
    mxfp4, dense = releases
    plan = uniform_plan(model, QuantConfig(bits=3, group_size=32))
    for name, folder in (("mxfp4", mxfp4), ("dense", dense)):
        moeq.quantize_checkpoint(folder, tmp_path / f"rtn-{name}", plan)
    files = sorted(p.name for p in (tmp_path / "rtn-dense").glob("*.safetensors"))
    for file in files:
        assert (tmp_path / "rtn-mxfp4" / file).read_bytes() == (tmp_path / "rtn-dense" / file).read_bytes()
    recorded = moeq.read_plan(tmp_path / "rtn-mxfp4").method["source_quantization"]
    assert recorded["quant_method"] == "mxfp4"
    from moeq.io.inspect import inspect_source

    assert inspect_source(mxfp4).stored_as.startswith("MXFP4")
    info = runner.invoke(app, ["info", str(mxfp4)])
    assert info.exit_code == 0 and "MXFP4" in info.output
    cli = runner.invoke(app, ["quantize", str(mxfp4), "--out", str(tmp_path / "cli"), "--bits", "3", "--group-size", "32"])
    assert cli.exit_code == 0, cli.output
    evaluated = moeq.evaluate(tmp_path / "cli", IDS.reshape(-1), reference=mxfp4, seq_len=12)
    assert 0 < evaluated.kl_to_reference < 0.05


def test_malformed_mxfp4_tensors_are_refused_before_any_output(releases, tmp_path: Path) -> None:
    mxfp4, _ = releases
    tensors = load_file(mxfp4 / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj"
    for what, change, message in (
        ("no scales", lambda t: t.pop(f"{key}_scales"), f"{key}_blocks in model.safetensors has no {key}_scales"),
        ("scales cut", lambda t: t.update({f"{key}_scales": t[f"{key}_scales"][..., :1].contiguous()}), "the checkpoint is malformed"),
    ):
        broken = tmp_path / what.replace(" ", "-")
        broken.mkdir()
        changed = dict(tensors)
        change(changed)
        save_file(changed, broken / "model.safetensors")
        (broken / "config.json").write_text((mxfp4 / "config.json").read_text())
        with pytest.raises(CheckpointError, match=message):
            open_lazy(broken).check_tensors()
        line = one_line_error(runner.invoke(app, ["quantize", str(broken), "--out", str(tmp_path / "q"), "--bits", "3"]))
        assert message in line
        assert not (tmp_path / "q").exists()
