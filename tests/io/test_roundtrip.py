"""quantize -> save -> load gives the same model, through moeq.load and through transformers."""

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import moeq
from moeq.atomic import OutputExistsError, OutputWriteError
from moeq.io.checkpoint import CheckpointError
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model
from tests.conftest import logits
from tests.modules.test_experts import mixed_plan


def _auto(model):
    return transformers.AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else transformers.AutoModelForCausalLM


def test_save_load_gives_identical_logits(family: str, tmp_path: Path) -> None:
    model = moeq.quantize(tiny_model(family), moeq.QuantConfig(bits=3, attn_bits=4, shared_bits=4, dense_bits=8))
    expected = logits(model)
    moeq.save(model, tmp_path / "q")
    assert torch.equal(logits(moeq.load(tmp_path / "q")), expected)
    via_transformers = _auto(model).from_pretrained(tmp_path / "q").eval()
    assert torch.equal(logits(via_transformers), expected)


def test_mixed_plan_round_trips_and_is_stored_packed(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    plan = mixed_plan(model, seed=1)
    model = moeq.quantize(model, plan)
    moeq.save(model, tmp_path / "q")
    assert torch.equal(logits(moeq.load(tmp_path / "q")), logits(model))
    assert moeq.read_plan(tmp_path / "q").to_json() == plan.to_json()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        for entry in plan.experts[:12]:
            name = f"model.layers.{entry.layer}.mlp.experts.{entry.expert}.{entry.projection}.codes"
            rows, cols = (64, 48) if entry.projection == "down_proj" else (48, 64)
            assert f.get_slice(name).get_shape() == [(rows * cols * entry.spec.bits + 7) // 8]
            assert f.get_slice(name).get_dtype() == "U8"


def test_experts_only_leaves_every_other_tensor_byte_identical(family: str, tmp_path: Path) -> None:
    original = tiny_model(family)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    _, layers = moe_layers_or_error(original)
    expert_prefixes = tuple(layer.experts_path + "." for layer in layers)
    moeq.save(moeq.quantize(original, moeq.QuantConfig(bits=2)), tmp_path / "q")
    loaded = moeq.load(tmp_path / "q").state_dict()
    kept = [k for k in before if not k.startswith(expert_prefixes)]
    assert kept and all(torch.equal(loaded[k], before[k]) and loaded[k].dtype == before[k].dtype for k in kept)
    assert not any(k.startswith(expert_prefixes) and k.endswith(("gate_up_proj", "down_proj", ".weight")) for k in loaded)


def test_sixteen_bits_is_a_no_op(family: str, tmp_path: Path) -> None:
    original = tiny_model(family)
    expected = logits(original)
    model = moeq.quantize(copy.deepcopy(original), moeq.QuantConfig(bits=16))
    assert torch.equal(logits(model), expected)
    moeq.save(model, tmp_path / "q")
    loaded = moeq.load(tmp_path / "q")
    reference = original.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in loaded.state_dict().items())
    # Same weights; transformers may pick another fused-experts kernel for a loaded checkpoint
    # (memory-mapped tensors), which sums in another order: float32 rounding only.
    torch.testing.assert_close(logits(loaded), expected, atol=1e-6, rtol=0)


def test_tokenizer_files_are_copied_and_the_source_is_untouched(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    (source / "tokenizer.json").write_text('{"fake": true}')
    snapshot = {p.name: p.read_bytes() for p in source.iterdir()}
    from moeq.io.source import load_source

    moeq.save(moeq.quantize(load_source(source), moeq.QuantConfig(bits=4)), tmp_path / "q")
    assert (tmp_path / "q" / "tokenizer.json").read_text() == '{"fake": true}'
    assert {p.name: p.read_bytes() for p in source.iterdir()} == snapshot


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path: Path) -> None:
    model = moeq.quantize(tiny_model("olmoe"), moeq.QuantConfig(bits=4))
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists; choose another --out or pass --overwrite"):
        moeq.save(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    moeq.save(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    model = moeq.quantize(tiny_model("olmoe"), moeq.QuantConfig(bits=4))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moeq.io.checkpoint.save_file", disk_full)
    with pytest.raises(OutputWriteError, match="writing .*q failed: the disk is full; nothing was written"):
        moeq.save(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_quantization_config_is_versioned(tmp_path: Path) -> None:
    moeq.save(moeq.quantize(tiny_model("mixtral"), moeq.QuantConfig(bits=3)), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "moeq" and quant["format_version"] == 1
    assert quant["plan"]["format"] == "moeq.bitplan" and quant["plan"]["version"] == 1
    quant["format_version"] = 99
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="moeq format 99; this moeq reads format 1"):
        moeq.load(tmp_path / "q")


def test_unquantized_models_cannot_be_saved_or_loaded_as_moeq(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="call moeq.quantize"):
        moeq.save(tiny_model("mixtral"), tmp_path / "q")
    tiny_model("mixtral").save_pretrained(tmp_path / "fp")
    with pytest.raises(CheckpointError, match="not a moeq checkpoint"):
        moeq.load(tmp_path / "fp")


def test_quantizing_twice_is_refused() -> None:
    model = moeq.quantize(tiny_model("mixtral"), moeq.QuantConfig(bits=3))
    with pytest.raises(ValueError, match="already quantized"):
        moeq.quantize(model, moeq.QuantConfig(bits=3))


def test_generate_works_on_the_loaded_model(tmp_path: Path) -> None:
    moeq.save(moeq.quantize(tiny_model("mixtral"), moeq.QuantConfig(bits=3)), tmp_path / "q")
    model = moeq.load(tmp_path / "q")
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_load_picks_the_experts_backend(tmp_path: Path) -> None:
    from moeq.modules.experts import QuantizedExperts

    model = moeq.quantize(tiny_model("mixtral"), moeq.QuantConfig(bits=4))
    moeq.save(model, tmp_path / "q")
    loaded = moeq.load(tmp_path / "q", backend="cpu-int4")
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedExperts)]
    assert layers and all(m.backend == "cpu-int4" for m in layers)
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=0)  # float32, another summation order
    assert any(getattr(m, "_int4_weights", None) for m in layers)  # the int4 kernel ran
    with pytest.raises(ValueError, match="unknown experts backend 'gpu'"):
        moeq.load(tmp_path / "q", backend="gpu")
