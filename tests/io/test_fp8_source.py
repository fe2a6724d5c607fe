"""Sources stored as block-scaled FP8 (DeepSeek-V3's layout) are read as floats, one tensor at a
time: the same bytes as quantizing the dequantized checkpoint; the formats' numerics equal
transformers' own dequantization."""

from __future__ import annotations

import hashlib
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
from moeq.io.streaming import quantize_checkpoint
from moeq.models.tiny import tiny_model
from moeq.quant.sources import dequantize_fp8_blocks, dequantize_mxfp4
from tests.conftest import one_line_error

runner = CliRunner()
BLOCK = [16, 16]  # DeepSeek-V3 uses 128 x 128; smaller blocks put several (and cut ones) in the tiny weights


@pytest.mark.parametrize("shape,block", [((64, 96), (16, 16)), ((50, 37), (16, 16)), ((300, 260), (128, 128))])
def test_fp8_blocks_dequantize_as_transformers_does(shape, block) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape, generator=gen) * 40).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=gen) * 1e-2
    theirs = _dequantize_fp8_weight(weight, scales, list(block), torch.float32)
    assert torch.equal(dequantize_fp8_blocks(weight, scales, block, torch.float32), theirs)
    with pytest.raises(ValueError, match="needs scales of shape"):
        dequantize_fp8_blocks(weight, scales[:1], block)


def test_mxfp4_dequantizes_as_transformers_does() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)  # [experts, out, groups, 16]
    scales = torch.randint(118, 136, (3, 40, 4), dtype=torch.uint8, generator=gen)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # gpt-oss's layout: [experts, in, out]
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2), theirs)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """The same bf16 model twice: stored as block-scaled FP8, and stored as those FP8 weights dequantized."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    root = tmp_path_factory.mktemp("fp8")
    model = tiny_model("mixtral").to(torch.bfloat16)
    model.save_pretrained(root / "fp8")
    model.save_pretrained(root / "dense")
    stored = load_file(root / "fp8" / "model.safetensors")
    fp8, dense = {}, {}
    # transformers 5 saves Mixtral's experts per expert (w1/w2/w3); the FP8 release stores those keys in FP8 too
    quantized = {k for k in stored if k.endswith(".weight") and stored[k].dim() == 2 and ".block_sparse_moe.gate." not in k
                 and k.startswith("model.layers.") and "norm" not in k}
    assert quantized
    for key, tensor in stored.items():
        if key not in quantized:
            fp8[key] = dense[key] = tensor
            continue
        rows, cols = tensor.shape
        blocks = tensor.float().reshape(-(-rows // BLOCK[0]), BLOCK[0], -(-cols // BLOCK[1]), BLOCK[1])  # tiny dims divide 16
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        code = (tensor.float() / scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)).to(torch.float8_e4m3fn)
        fp8[key], fp8[key[: -len("weight")] + "weight_scale_inv"] = code, scale
        dense[key] = _dequantize_fp8_weight(code, scale, BLOCK, torch.float32).to(torch.bfloat16)
    save_file(fp8, root / "fp8" / "model.safetensors", metadata={"format": "pt"})
    save_file(dense, root / "dense" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK}
    (root / "fp8" / "config.json").write_text(json.dumps(config))
    return root / "fp8", root / "dense", model


def _weights(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_an_fp8_source_quantizes_to_the_bytes_of_its_dequantized_weights(sources, tmp_path: Path) -> None:
    fp8, dense, model = sources
    plan = uniform_plan(model, QuantConfig(bits=3, group_size=32, attn_bits=4))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    for name, folder in (("fp8", fp8), ("dense", dense)):
        quantize_checkpoint(folder, plan, tmp_path / f"rtn-{name}")
        quantize_calibrated(folder, plan, ids, tmp_path / f"gptq-{name}", CalibrationConfig(min_tokens=2))
    assert _weights(tmp_path / "rtn-fp8") == _weights(tmp_path / "rtn-dense")
    assert _weights(tmp_path / "gptq-fp8") == _weights(tmp_path / "gptq-dense")
    for road in ("rtn", "gptq"):
        recorded = moeq.read_plan(tmp_path / f"{road}-fp8").method["source_quantization"]
        assert recorded["quant_method"] == "fp8" and recorded["weight_block_size"] == BLOCK
        assert "source_quantization" not in moeq.read_plan(tmp_path / f"{road}-dense").method
    loaded = moeq.load(tmp_path / "rtn-fp8")  # a moeq checkpoint like any other
    assert loaded(input_ids=ids).logits.isfinite().all()
    plan = moeq.allocate(fp8, "router-maxvar", avg_bits=2.5)  # data-free allocation reads it too
    assert plan.budget["avg_expert_bits"] <= 2.5
    from moeq.io.inspect import inspect_source

    assert inspect_source(fp8).stored_as.startswith("FP8 (e4m3) with 16x16 block scales")  # moeq info says so


def test_an_fp8_source_loads_as_its_dequantized_weights_for_eval_and_qat(sources) -> None:
    from moeq.io.source import load_source

    fp8, dense, _ = sources
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = load_source(fp8)(input_ids=ids).logits, load_source(dense)(input_ids=ids).logits
    assert torch.equal(ours, theirs)  # what `moeq eval --reference`, `analyze` and `qat` read it as
    report = moeq.evaluate(fp8, ids.reshape(-1), reference=dense, seq_len=16)
    assert report.kl_to_reference == 0.0


def test_fp8_sources_without_block_scales_are_refused(sources, tmp_path: Path) -> None:
    fp8, _, _ = sources
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(fp8 / "model.safetensors")
    victim = next(k for k in tensors if k.endswith("weight_scale_inv"))
    del tensors[victim]
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((fp8 / "config.json").read_text())
    line = one_line_error(runner.invoke(app, ["quantize", str(broken), "--out", str(tmp_path / "q"), "--bits", "3"]))
    assert "is float8 without block scales" in line and victim in line
    config = json.loads((fp8 / "config.json").read_text())
    del config["quantization_config"]["weight_block_size"]
    (broken / "config.json").write_text(json.dumps(config))
    line = one_line_error(runner.invoke(app, ["quantize", str(broken), "--out", str(tmp_path / "q"), "--bits", "3"]))
    assert "is FP8 without a weight_block_size" in line
    assert not (tmp_path / "q").exists()
