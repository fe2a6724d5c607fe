"""`moeq qat` and `moeq train-router` end to end: outputs that load and say what was done, the
source never changed, and one-line errors for bad input."""

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.models.tiny import tiny_model
from tests.conftest import add_tokenizer

runner = CliRunner()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(folder)
    add_tokenizer(folder)
    return folder


@pytest.fixture
def text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i % 37} and then some more text" for i in range(400)))
    return path


def test_qat_exports_a_packed_model_that_records_its_training(source: Path, text: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    uniform_plan(tiny_model("mixtral"), QuantConfig(bits=2)).save(plan_path)
    before = _digest(source)
    args = ["qat", str(source), "--plan", str(plan_path), "--out", str(tmp_path / "q"), "--steps", "2", "--data", str(text)]
    result = runner.invoke(app, [*args, "--objective", "distill"])
    assert result.exit_code == 0, result.output
    assert _digest(source) == before, "the source checkpoint must never change"
    model = moeq.load(tmp_path / "q")
    qat = moeq.read_plan(tmp_path / "q").method["qat"]
    assert qat["objective"] == "distill" and qat["steps"] == 2 and qat["data"] == str(text)
    assert torch.isfinite(model(input_ids=torch.arange(16)[None]).logits).all()
    again = runner.invoke(app, [*args, "--objective", "distill"])
    assert again.exit_code == 2 and "already exists" in again.output  # no half-written or replaced output
    wrong = runner.invoke(app, [*args[:-4], "--out", str(tmp_path / "w"), "--objective", "mse"])
    assert wrong.exit_code == 2 and "unknown QAT objective 'mse'" in wrong.output and not (tmp_path / "w").exists()


def test_train_router_output_is_a_reference_for_allocate(source: Path, text: Path, tmp_path: Path) -> None:
    before = _digest(source)
    tuned = tmp_path / "tuned"
    result = runner.invoke(app, ["train-router", str(source), "--out", str(tuned), "--calib", str(text), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert _digest(source) == before
    plan = tmp_path / "plan.json"
    allocated = runner.invoke(app, ["allocate", str(source), "--avg-bits", "2.5", "--levels", "3,2", "--strategy", "router",
                                    "--reference", str(tuned), "--out", str(plan), "--no-guard"])
    assert allocated.exit_code == 0, allocated.output
    assert "router-only fine-tune" in moeq.BitPlan.load(plan).method["router_signal"]
    missing = runner.invoke(app, ["train-router", str(source), "--out", str(tmp_path / "t2"), "--calib", str(tmp_path / "no.txt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and not (tmp_path / "t2").exists()
