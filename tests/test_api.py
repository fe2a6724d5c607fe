"""moeq.quantize_checkpoint: a folder into a folder, the road the `quantize` command takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeq
from moeq.calibrate.runner import CalibrationConfig
from moeq.models.tiny import tiny_model
from tests.conftest import logits


def test_rounding_a_folder_equals_rounding_in_memory(tmp_path: Path) -> None:
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    result = moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", moeq.QuantConfig(bits=3), seed=7)
    assert result.out == tmp_path / "q" and result.report is None and result.plan.method["seed"] == 7
    assert torch.equal(logits(moeq.load(tmp_path / "q")), logits(moeq.quantize(model, moeq.QuantConfig(bits=3))))


def test_gptq_from_token_ids_reports_every_expert(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="needs calibration text"):
        moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", moeq.QuantConfig(bits=3), quantizer="gptq")
    assert not (tmp_path / "q").exists()
    result = moeq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", moeq.QuantConfig(bits=3), quantizer="gptq",
                                      calibration=ids, calibration_config=CalibrationConfig(min_tokens=4))
    assert result.report.calibration_tokens == ids.numel() and len(result.report.tokens) == 2
    assert result.plan.method["quantizer"]["name"] == "gptq" and moeq.read_plan(tmp_path / "q").method == result.plan.method
