"""The lazy reader: both on-disk expert layouts, sharded checkpoints, and named errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeq.io.checkpoint import CheckpointError
from moeq.io.lazy import open_lazy
from moeq.models import moe_layers_or_error
from moeq.models.tiny import tiny_model


def _legacy_mixtral_state(model) -> dict[str, torch.Tensor]:
    """The pre-transformers-5 Mixtral layout: block_sparse_moe, one w1/w3/w2 tensor per expert."""
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("experts.gate_up_proj"):
            prefix = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                state[f"{prefix}.{e}.w1.weight"] = tensor[e, :half].clone()
                state[f"{prefix}.{e}.w3.weight"] = tensor[e, half:].clone()
        elif key.endswith("experts.down_proj"):
            prefix = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(tensor.shape[0]):
                state[f"{prefix}.{e}.w2.weight"] = tensor[e].clone()
        else:
            state[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor.clone()
    return state


def _assert_same_layers(folder: Path, model) -> None:
    lazy = open_lazy(folder)
    _, layers = moe_layers_or_error(model)
    for mine, theirs in zip(lazy.layers, layers):
        assert torch.equal(mine.router_weight, theirs.router_weight.detach())
        for e in range(theirs.num_experts):
            for p in theirs.projections:
                assert torch.equal(mine.expert_weight(e, p), theirs.expert_weight(e, p).detach())


def test_fused_layout(tmp_path: Path) -> None:
    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "m")
    _assert_same_layers(tmp_path / "m", model)


def test_legacy_per_expert_layout_in_shards(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    folder = tmp_path / "legacy"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = _legacy_mixtral_state(model)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, folder / name)
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_layers(folder, model)


def test_a_missing_expert_tensor_is_named(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    folder = tmp_path / "broken"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.experts.down_proj" not in k}
    save_file(state, folder / "model.safetensors")
    lazy = open_lazy(folder)
    with pytest.raises(CheckpointError, match="no tensor for expert 0 down_proj of model.layers.1.mlp"):
        lazy.layers[1].expert_weight(0, "down_proj")


def test_a_corrupt_shard_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    tiny_model("olmoe").save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        open_lazy(folder)
