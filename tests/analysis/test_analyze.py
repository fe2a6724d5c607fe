"""Weight statistics against hand formulas and scipy, and the analyze report on every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeq.analysis import weights
from moeq.analysis.report import analyze
from moeq.analysis.weights import HISTOGRAM_EDGES, tensor_stats
from moeq.cli import app
from moeq.atomic import OutputExistsError
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


def test_tensor_statistics_by_hand() -> None:
    # A two-point tensor: μ = 0, σ = 1, E[w⁴] = 1, so the excess kurtosis is 1 − 3 = −2.
    two_point = tensor_stats("w", "dense", torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    assert (two_point.std, two_point.kurtosis, two_point.outlier_share) == (1.0, -2.0, 0.0)
    # One 1 among n − 1 zeros is Bernoulli(p = 1/n): σ² = p(1−p), excess kurtosis (1 − 6p(1−p)) / (p(1−p)),
    # and the 1 lies sqrt((1−p)/p) ≈ 9.95 σ from the mean (n = 100): one outlier in 100.
    n, p = 100, 0.01
    spike = torch.zeros(n)
    spike[17] = 1.0
    stats = tensor_stats("s", "dense", spike)
    assert stats.std == pytest.approx((p * (1 - p)) ** 0.5, rel=1e-12)
    assert stats.kurtosis == pytest.approx((1 - 6 * p * (1 - p)) / (p * (1 - p)), rel=1e-12)
    assert stats.outlier_share == 1 / n
    constant = tensor_stats("c", "dense", torch.full((3, 3), 0.5))
    assert (constant.std, constant.kurtosis, constant.outlier_share, constant.minimum) == (0.0, 0.0, 0.0, 0.5)


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(2, 300), chunk=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_chunked_statistics_equal_whole_tensor(numel: int, chunk: int, seed: int) -> None:
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) ** 3  # heavy tails
    whole = torch.zeros(len(HISTOGRAM_EDGES) - 1, dtype=torch.float64)
    expected = tensor_stats("w", "dense", weight, whole)
    chunked = torch.zeros_like(whole)
    original = weights._CHUNK
    weights._CHUNK = chunk
    try:
        got = tensor_stats("w", "dense", weight, chunked)
    finally:
        weights._CHUNK = original
    assert (got.minimum, got.maximum, got.outlier_share) == (expected.minimum, expected.maximum, expected.outlier_share)
    assert got.std == pytest.approx(expected.std, rel=1e-9)
    assert got.kurtosis == pytest.approx(expected.kurtosis, rel=1e-9, abs=1e-9)
    assert torch.equal(chunked, whole)
    values = weight.double().numpy()
    standard = (values - values.mean()) / values.std()
    assert whole.sum() == (abs(standard) <= 12).sum()  # the bins span ±12σ; entries beyond are not binned


def test_report_for_every_family(tmp_path: Path, source_folder: Path, family: str) -> None:
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = analyze(source_folder, tmp_path / "report", calibration=calibration)
    roles = {r.role for r in report.roles}
    assert {"routed experts", "attention", "embeddings"} <= roles
    if family in ("deepseek_v3", "qwen2_moe"):
        assert "shared experts" in roles
    if family == "deepseek_v3":
        assert "dense" in roles  # its first layer is a dense feed-forward
    lazy = open_lazy(source_folder)
    expected = sum(layer.num_experts * len(layer.projections) for layer in lazy.layers)
    by_role = {r.role: r for r in report.roles}
    assert by_role["routed experts"].tensors == expected
    assert len([t for t in report.tensors if t.role == "router" and "shared_expert_gate" not in t.name]) == len(lazy.layers)
    tied = "lm_head.weight" in (lazy.skeleton.all_tied_weights_keys or {})
    assert ("lm_head" in roles) != tied  # a tied head is the embedding, counted once
    for r in report.roles:
        assert r.numel == sum(t.numel for t in report.tensors if t.role == r.role)
        assert sum(r.histogram) <= r.numel and sum(r.histogram) >= r.numel * (1 - r.outlier_share) - 1e-9
    assert report.router_signal == "router_final_norm" and len(report.spearman) == len(report.router_change)
    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"report.md", "analysis.json", "weights_boxplots.png", "weights_histograms.png", "router_change_vs_frequency.png"}
    assert "proxy" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "analysis.json").read_text())["spearman_router_change_vs_frequency"] == report.spearman


@pytest.mark.parametrize("model_type", ["gpt_oss", "zaya"])
def test_report_for_families_read_by_structure(model_type: str, tmp_path: Path) -> None:
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config(model_type)
    torch.manual_seed(0)
    auto_model_class(config).from_config(config).save_pretrained(tmp_path / "src")
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    report = analyze(tmp_path / "src", tmp_path / "report", calibration=calibration)
    layers = open_lazy(tmp_path / "src").layers
    by_role = {r.role: r for r in report.roles}
    assert by_role["routed experts"].tensors == sum(layer.num_experts * len(layer.projections) for layer in layers)
    assert report.frequency is not None and report.calibration_tokens == calibration.numel()
    if model_type == "zaya":  # its routers are networks: their linears are the router role, no norm signal
        assert report.router_signal == "none" and report.router_change == [] and by_role["router"].tensors > len(layers)
        assert "networks of their own" in (tmp_path / "report" / "report.md").read_text()
    else:
        assert report.router_signal == "router_final_norm" and len(report.router_change) == len(layers)


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


def test_constant_router_change_has_no_rank_correlation(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    report = analyze(tmp_path / "src", tmp_path / "r", calibration=calibration, reference=tmp_path / "src")
    assert report.router_signal == "router_norm_change" and report.spearman == [None, None]  # Λ = 0 everywhere
    text = (tmp_path / "r" / "analysis.json").read_text()
    assert "NaN" not in text and json.loads(text)["spearman_router_change_vs_frequency"] == [None, None]
    assert "| 0 | n/a |" in (tmp_path / "r" / "report.md").read_text()


def test_bad_inputs_fail_with_one_line(tmp_path: Path) -> None:
    tiny_model("mixtral").save_pretrained(tmp_path / "src")  # no tokenizer
    (tmp_path / "text.txt").write_text("some calibration text\n")
    cases = {
        ("analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "a")): "does not exist",
        ("analyze", str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--calib", str(tmp_path / "no.txt")): "does not exist",
        ("analyze", str(tmp_path / "src"), "--out", str(tmp_path / "c"), "--calib-tokens", "8"): "less than one sequence",
        ("analyze", str(tmp_path / "src"), "--out", str(tmp_path / "d"), "--calib", str(tmp_path / "text.txt")): "tokenizer",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert result.output.count("\n") == 1
    assert not any((tmp_path / name).exists() for name in "abcd")
