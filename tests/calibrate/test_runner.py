"""Layer-by-layer GPTQ: better than rounding, rare experts handled, deterministic, one layer at a time."""

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

import moeq
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.config import QuantConfig, uniform_plan
from moeq.io.lazy import LazyModel
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from tests.conftest import logits


def _ids(n: int = 16, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def correlate(model) -> None:
    """Give the random model trained-like, correlated activations: low-rank token embeddings.

    With isotropic inputs (a random model's) GPTQ's Hessian is nearly a multiple of the identity
    and GPTQ reduces to rounding; real activations are strongly correlated."""
    embed = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        low_rank = torch.randn(embed.shape[0], 4, generator=gen) @ torch.randn(4, embed.shape[1], generator=gen)
        embed.copy_(low_rank + 0.1 * torch.randn(embed.shape, generator=gen))


def _source(tmp_path: Path, family: str, edit=None) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family)
    correlate(model)
    if edit:
        edit(model)
    model.save_pretrained(tmp_path / "src")
    return tmp_path / "src", model


def _first_moe_error(model, reference) -> float:
    return _moe_error(model, reference, 0)


def _moe_error(model, reference, layer: int) -> float:
    """Relative error of one MoE layer's experts on held-out tokens (fed the reference's inputs)."""
    _, layers = moe_layers_or_error(reference)
    path = layers[layer].experts_path
    calls = []
    handle = reference.get_submodule(path).register_forward_pre_hook(lambda m, a: calls.append(a))
    logits(reference, seed=5)
    handle.remove()
    with torch.no_grad():
        expected = torch.cat([reference.get_submodule(path)(*a) for a in calls])
        got = torch.cat([model.get_submodule(path)(*a) for a in calls])
    return float((got - expected).norm() / expected.norm())


def _relative_error(model, reference) -> float:
    ref = logits(reference, seed=5)
    return float((logits(model, seed=5) - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_experts_are_closer_to_full_precision_than_rounding(tmp_path: Path, family: str, bits: int) -> None:
    source, model = _source(tmp_path, family)
    quantize_calibrated(source, uniform_plan(model, QuantConfig(bits=bits)), _ids(32), tmp_path / "gptq")
    rounded = tiny_model(family)
    correlate(rounded)
    rounded = moeq.quantize(rounded, uniform_plan(model, QuantConfig(bits=bits)))
    assert _first_moe_error(moeq.load(tmp_path / "gptq"), model) < 0.95 * _first_moe_error(rounded, model)


def test_expert_without_tokens_is_quantized_with_the_recorded_fallback(tmp_path: Path) -> None:
    def starve(model):  # DeepSeek's selection bias makes expert 5 of the first MoE layer unreachable
        model.model.layers[1].mlp.gate.e_score_correction_bias[5] = -1e4

    source, model = _source(tmp_path, "deepseek_v3", starve)
    for fallback, method in (("rtn", "rtn-clip"), ("all-tokens", "gptq-all-tokens")):
        plan = uniform_plan(model, QuantConfig(bits=3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = quantize_calibrated(source, plan, _ids(), tmp_path / fallback, CalibrationConfig(rare_fallback=fallback))
        assert report.tokens[0][5] == 0 and report.methods[0][5] == method
        assert (0, 5, 0) in report.starved
        assert any("layer 0 expert 5 (0 tokens)" in str(w.message) for w in caught)
        saved = moeq.read_plan(tmp_path / fallback)
        assert saved.scores["calibration_tokens"][0][5] == 0
        assert saved.method["quantizer"]["expert_methods"][0][5] == method
        loaded = moeq.load(tmp_path / fallback)
        expert = loaded.model.layers[1].mlp.experts.expert(5)["down_proj"]
        assert expert.spec.bits == 3 and torch.isfinite(expert.weight).all()


def test_same_inputs_give_byte_identical_checkpoints(tmp_path: Path) -> None:
    """Twice in this process, and once with each layer's quantize_layer jobs run by a pool of two
    spawned processes: the same bytes (the per-layer step is a pure function of plain data)."""
    from moeq.executors import LocalExecutor, SerialExecutor

    source, model = _source(tmp_path, "mixtral")
    digests = []
    with LocalExecutor(2) as pool:
        for run, executor in (("a", None), ("b", SerialExecutor()), ("pool", pool)):
            plan = uniform_plan(model, QuantConfig(bits=3, group_size=32, attn_bits=4))
            quantize_calibrated(source, plan, _ids(), tmp_path / run, CalibrationConfig(act_order=True), executor=executor)
            digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / run).iterdir()})
    assert digests[0] == digests[1] == digests[2]


def test_only_one_decoder_layer_is_ever_materialized(tmp_path: Path, monkeypatch) -> None:
    source, model = _source(tmp_path, "qwen2_moe")
    active: set[str] = set()
    most = []
    materialize, release = LazyModel.materialize, LazyModel.release

    def tracked_materialize(self, path):
        module = materialize(self, path)
        if ".layers." in path:
            active.add(path)
            on_cpu = [i for i, layer in enumerate(self.skeleton.model.layers) if next(layer.parameters()).device.type != "meta"]
            most.append(len(on_cpu))
        return module

    def tracked_release(self, path):
        active.discard(path)
        release(self, path)

    monkeypatch.setattr(LazyModel, "materialize", tracked_materialize)
    monkeypatch.setattr(LazyModel, "release", tracked_release)
    quantize_calibrated(source, uniform_plan(model, QuantConfig(bits=3, shared_bits=4)), _ids(), tmp_path / "q")
    assert most == [1, 1] and not active


def test_shared_experts_and_attention_get_gptq_too(tmp_path: Path) -> None:
    source, model = _source(tmp_path, "qwen2_moe")
    plan = uniform_plan(model, QuantConfig(bits=3, shared_bits=3, attn_bits=3))
    quantize_calibrated(source, plan, _ids(32), tmp_path / "gptq")
    rounded = tiny_model("qwen2_moe")
    correlate(rounded)
    rounded = moeq.quantize(rounded, uniform_plan(model, QuantConfig(bits=3, shared_bits=3, attn_bits=3)))
    loaded = moeq.load(tmp_path / "gptq")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert _relative_error(loaded, model) < _relative_error(rounded, model)


def test_switch_encoder_decoder_gets_gptq_block_by_block(tmp_path: Path) -> None:
    source, model = _source(tmp_path, "switch_transformers")
    quantize_calibrated(source, uniform_plan(model, QuantConfig(bits=3)), _ids(32), tmp_path / "gptq")
    rounded = tiny_model("switch_transformers")
    correlate(rounded)
    rounded = moeq.quantize(rounded, uniform_plan(model, QuantConfig(bits=3)))
    loaded = moeq.load(tmp_path / "gptq")
    assert torch.equal(loaded.shared.weight, model.shared.weight)
    for layer in (0, 1):  # encoder and decoder MoE layers
        assert _moe_error(loaded, model, layer) < 0.95 * _moe_error(rounded, model, layer)


def test_non_finite_weights_are_named(tmp_path: Path) -> None:
    def poison(model):
        with torch.no_grad():
            model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")

    source, model = _source(tmp_path, "olmoe", poison)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.\d\.(down|gate|up)_proj"):
        quantize_calibrated(source, uniform_plan(tiny_model("olmoe"), QuantConfig(bits=3)), _ids(), tmp_path / "q")
    assert not (tmp_path / "q").exists()
