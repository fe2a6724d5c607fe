"""Checkpoint-to-checkpoint quantization, block by block, equals quantizing the loaded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moeq
from moeq.config import QuantConfig, uniform_plan
from moeq.io.checkpoint import CheckpointError
from moeq.io.lazy import open_lazy
from moeq.io.source import load_source
from moeq.io.streaming import block_paths, quantize_checkpoint
from moeq.models.tiny import tiny_model
from tests.conftest import logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_streaming_equals_in_memory_quantization(tmp_path: Path, source_folder: Path) -> None:
    """Every tensor bit-identical to moeq.quantize + moeq.save, for every family, with attention
    and the head packed too (Switch's head is tied to its embeddings)."""
    model = load_source(source_folder)
    plan = uniform_plan(model, QuantConfig(bits=3, attn_bits=4, lm_head_bits=8))
    moeq.quantize(model, plan)
    moeq.save(model, tmp_path / "memory", source=source_folder)
    progress: list[str] = []
    quantize_checkpoint(source_folder, plan, tmp_path / "streamed", progress=progress.append)

    expected, got = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    assert progress == [*block_paths(open_lazy(source_folder)), "rest"]
    loaded = moeq.load(tmp_path / "streamed")
    assert torch.equal(logits(loaded), logits(model))
    assert not list(tmp_path.glob(".*partial"))


def test_sharded_legacy_layout_is_read_shard_by_shard(tmp_path: Path) -> None:
    """transformers 5 saves Mixtral as per-expert w1/w3/w2 keys under block_sparse_moe, sharded."""
    source = tmp_path / "source"
    model = tiny_model("mixtral")
    model.save_pretrained(source, max_shard_size="100KB")
    assert len(list(source.glob("model-*.safetensors"))) > 2
    assert any(".block_sparse_moe.experts.0.w1." in key for key in (source / "model.safetensors.index.json").read_text().split('"'))
    plan = uniform_plan(model, QuantConfig(bits=2))
    quantize_checkpoint(source, plan, tmp_path / "out")
    reference = moeq.quantize(load_source(source), plan)
    assert torch.equal(logits(moeq.load(tmp_path / "out")), logits(reference))
    index = (tmp_path / "out" / "model.safetensors.index.json").read_text()
    assert "model-layers-0.safetensors" in index and "rest.safetensors" in index


def test_refuses_quantized_source_and_foreign_plan(tmp_path: Path) -> None:
    source = tmp_path / "source"
    tiny_model("olmoe").save_pretrained(source)
    plan = uniform_plan(load_source(source), QuantConfig(bits=3))
    quantize_checkpoint(source, plan, tmp_path / "q")
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", plan, tmp_path / "again")
    other = tmp_path / "other"
    tiny_model("mixtral").save_pretrained(other)
    with pytest.raises(ValueError, match="the plan is for a olmoe model"):
        quantize_checkpoint(other, plan, tmp_path / "mismatch")
    assert not (tmp_path / "mismatch").exists() and not (tmp_path / ".mismatch.partial").exists()


def test_truncated_shard_names_file_and_tensor(tmp_path: Path) -> None:
    source = tmp_path / "source"
    model = tiny_model("mixtral")
    model.save_pretrained(source, max_shard_size="100KB")
    plan = uniform_plan(model, QuantConfig(bits=3))
    victim = sorted(source.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 64])
    # Caught from the header, before any tensor is read: the last tensor's bytes lie past the end.
    with pytest.raises(CheckpointError, match=rf"{victim}: tensor \S+ claims .* truncated or corrupt"):
        quantize_checkpoint(source, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_same_bytes_from_a_process_pool(tmp_path: Path) -> None:
    """Each unit is a pure job (UnitJob -> tensors): a pool of two processes writes the very bytes
    the serial road writes."""
    import hashlib

    from moeq.executors import LocalExecutor

    source = tmp_path / "source"
    model = tiny_model("deepseek_v3")
    model.save_pretrained(source, max_shard_size="100KB")
    plan = uniform_plan(model, QuantConfig(bits=3, attn_bits=4))
    quantize_checkpoint(source, plan, tmp_path / "serial")
    with LocalExecutor(2) as pool:
        quantize_checkpoint(source, plan, tmp_path / "pool", executor=pool)

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    assert digests(tmp_path / "serial") == digests(tmp_path / "pool")
