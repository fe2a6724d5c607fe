"""Weight statistics against scipy, and the analyze report on every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

from moeq.analysis.report import analyze
from moeq.analysis.weights import tensor_stats
from moeq.cli import app
from moeq.io.atomic import OutputExistsError
from moeq.io.lazy import open_lazy
from moeq.models.tiny import tiny_model


def test_tensor_statistics_match_scipy() -> None:
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    weight[3, 7] = 40.0  # one outlier, far beyond 6 sigma
    stats = tensor_stats("w", "dense", weight)
    values = weight.double().reshape(-1).numpy()
    assert stats.std == pytest.approx(values.std(), rel=1e-12)
    assert stats.kurtosis == pytest.approx(scipy.stats.kurtosis(values, fisher=True, bias=True), rel=1e-10)
    assert stats.outlier_share == pytest.approx(1 / values.size)
    assert (stats.minimum, stats.maximum) == (pytest.approx(values.min()), 40.0)
    gaussian = tensor_stats("g", "dense", torch.randn(200_000, generator=torch.Generator().manual_seed(1)))
    assert abs(gaussian.kurtosis) < 0.05 and gaussian.outlier_share < 1e-5


def test_report_for_every_family(tmp_path: Path, source_folder: Path, family: str) -> None:
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = analyze(source_folder, tmp_path / "report", calibration=calibration)
    roles = {r.role for r in report.roles}
    assert {"routed experts", "attention", "embeddings"} <= roles
    if family in ("deepseek_v3", "qwen2_moe"):
        assert "shared experts" in roles
    if family == "deepseek_v3":
        assert "dense" in roles  # its first layer is a dense feed-forward
    expected = sum(layer.num_experts * len(layer.projections) for layer in open_lazy(source_folder).layers)
    assert next(r for r in report.roles if r.role == "routed experts").tensors == expected
    assert report.router_signal == "router_final_norm" and len(report.spearman) == len(report.router_change)
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"report.md", "analysis.json", "weights_boxplots.png", "weights_histograms.png", "router_change_vs_frequency.png"}
    assert "proxy" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "analysis.json").read_text())["spearman_router_change_vs_frequency"] == report.spearman


def test_initial_routers_give_the_true_change_and_outputs_are_refused(tmp_path: Path) -> None:
    tiny_model("mixtral").save_pretrained(tmp_path / "src")
    tiny_model("mixtral", seed=3).save_pretrained(tmp_path / "init")
    report = analyze(tmp_path / "src", tmp_path / "r", reference=tmp_path / "init")
    assert report.router_signal == "router_norm_change" and report.frequency is None  # no text, no tokenizer
    with pytest.raises(OutputExistsError):
        analyze(tmp_path / "src", tmp_path / "r")
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "src"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "already exists" in result.output
    ok = CliRunner().invoke(app, ["analyze", str(tmp_path / "src"), "--out", str(tmp_path / "r2")], env={"COLUMNS": "200"})
    assert ok.exit_code == 0 and "routed experts" in ok.output
