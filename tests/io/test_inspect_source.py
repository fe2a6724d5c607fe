"""``moeq info`` on a model folder: whether moeq can quantize it and what it found, from headers."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moeq.cli import app
from moeq.io.inspect import inspect_source
from moeq.models.tiny import tiny_model
from tests.conftest import one_line_error

runner = CliRunner()


def test_shared_experts_dense_blocks_and_routers_are_found(tmp_path: Path) -> None:
    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "ds")
    report = inspect_source(tmp_path / "ds")
    first_dense = model.config.first_k_dense_replace
    assert report.family == "structural" and report.dense_blocks == [f"model.layers.{i}" for i in range(first_dense)]
    assert len(report.moe_layers) == model.config.num_hidden_layers - first_dense
    assert report.shared_experts and all(".shared_experts" in name for name in report.shared_experts)
    assert all(shape == (model.config.n_routed_experts, model.config.hidden_size) for _, shape in report.routers)
    assert report.experts_per_token == model.config.num_experts_per_tok
    expected = sum(n * sum(o * i for o, i in shapes.values()) for _, n, shapes in report.moe_layers)
    assert report.expert_parameters == expected
    result = runner.invoke(app, ["info", str(tmp_path / "ds")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "moeq can quantize this model" in result.output and "dense blocks" in result.output


def test_what_moeq_cannot_read_gets_one_line(tmp_path: Path) -> None:
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "has no moeq adapter and no routed experts" in one_line_error(runner.invoke(app, ["info", str(tmp_path / "other")]))
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    missing = next(name for name in tensors if "experts" in name)
    del tensors[missing]
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    assert "has no tensor for expert" in one_line_error(runner.invoke(app, ["info", str(tmp_path / "q")]))
