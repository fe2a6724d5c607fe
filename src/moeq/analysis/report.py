"""``moeq analyze``: the two papers' claims about a model's weights and routers, as a report folder.

- MoQE: routed-expert weights are better behaved (fewer outliers, lower kurtosis) than dense ones
  (:mod:`.weights`).
- Expert-wise mixed precision: rarely used experts grow their routers least, i.e. the router-norm
  change Λ correlates with activation frequency. Λ comes from the initial routers shipped beside
  the checkpoint or ``reference`` (else the final-norm proxy, labelled as such); frequency from
  calibration text (default: the project's corpus when the folder has a tokenizer). Spearman's ρ
  per layer.

Writes ``report.md``, ``analysis.json`` and PNG plots (box plots of per-tensor kurtosis and
outlier share by role, weight histograms by role, Λ against frequency per layer) into a folder
that appears complete or not at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from scipy.stats import spearmanr

from ..io.atomic import atomic_directory
from .weights import RoleSummary, TensorStats, weight_statistics

__all__ = ["AnalysisReport", "analyze"]


@dataclass
class AnalysisReport:
    model: str
    tensors: list[TensorStats]
    roles: list[RoleSummary]
    router_signal: str  # "router_norm_change" or "router_final_norm" (the proxy)
    router_change: list[list[float]]
    frequency: list[list[float]] | None
    spearman: list[float] | None  # per layer, Λ against frequency
    calibration_tokens: int

    def to_json(self) -> dict:
        return {
            "model": self.model, "roles": [r.to_json() for r in self.roles], "tensors": [asdict(t) for t in self.tensors],
            "router_signal": self.router_signal, "router_change": self.router_change, "frequency": self.frequency,
            "spearman_router_change_vs_frequency": self.spearman, "calibration_tokens": self.calibration_tokens,
        }


def analyze(
    model_path: str | Path,
    out: str | Path,
    calibration: torch.Tensor | str | Path | None = None,
    reference: str | Path | None = None,
    calib_tokens: int = 16384,
    seq_len: int = 256,
    overwrite: bool = False,
) -> AnalysisReport:
    """Analyse the checkpoint at ``model_path`` and write the report folder ``out``."""
    from ..allocate.api import _calibrate, _open, _router_signal
    from ..io.atomic import ensure_output_free
    from ..plan import PlanError

    ensure_output_free(Path(out), overwrite)
    source = _open(model_path)
    tensors, roles = weight_statistics(source.lazy)
    scores: dict = {}
    change = _router_signal(source, source.layers, reference, scores, {})
    signal = next(iter(scores))
    frequency, rho, tokens = None, None, 0
    try:
        method: dict = {}
        stats = _calibrate(source, model_path, calibration, calib_tokens, seq_len, False, method)
        frequency = stats.frequency.tolist()
        tokens = int(method["calibration"]["sequences"] * method["calibration"]["sequence_length"])
        rho = [float(spearmanr(c, f[: len(c)]).statistic) for c, f in zip(change, frequency)]
    except PlanError:
        pass  # no calibration text and no tokenizer: the weight statistics stand alone
    report = AnalysisReport(str(model_path), tensors, roles, signal, change, frequency, rho, tokens)
    with atomic_directory(Path(out), overwrite=overwrite) as work:
        (work / "analysis.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
        _plots(report, work)
        (work / "report.md").write_text(_markdown(report))
    return report


def _plots(report: AnalysisReport, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roles = [r.role for r in report.roles]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field, label in ((axes[0], "kurtosis", "excess kurtosis per tensor"), (axes[1], "outlier_share", "share of |w-μ| > 6σ per tensor")):
        ax.boxplot([[getattr(t, field) for t in report.tensors if t.role == role] for role in roles], tick_labels=roles)
        ax.set_yscale("symlog", linthresh=1e-4 if field == "outlier_share" else 1.0)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(folder / "weights_boxplots.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for summary in report.roles:
        values = np.asarray(summary.sample)
        std = values.std() or 1.0
        ax.hist(values / std, bins=120, range=(-10, 10), density=True, histtype="step", label=summary.role)
    ax.set_yscale("log")
    ax.set_xlabel("weight / σ of its role (sampled)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "weights_histograms.png", dpi=120)
    plt.close(fig)

    if report.frequency is not None:
        layers = len(report.router_change)
        cols = min(layers, 4)
        rows = math.ceil(layers / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
        for i, (change, freq) in enumerate(zip(report.router_change, report.frequency)):
            ax = axes[i // cols][i % cols]
            ax.scatter(freq[: len(change)], change, s=14)
            ax.set_title(f"layer {i}: ρ = {report.spearman[i]:.2f}", fontsize=9)
            ax.set_xlabel("activation frequency", fontsize=8)
            ax.set_ylabel("Λ" if report.router_signal == "router_norm_change" else "final router norm (proxy)", fontsize=8)
        for j in range(layers, rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        fig.savefig(folder / "router_change_vs_frequency.png", dpi=120)
        plt.close(fig)


def _markdown(report: AnalysisReport) -> str:
    lines = [f"# moeq analyze: {report.model}", "", "## Weights by layer type", "",
             "| role | tensors | weights | min | max | mean σ | median excess kurtosis | max | share > 6σ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.roles:
        lines.append(f"| {r.role} | {r.tensors} | {r.numel:,} | {r.minimum:.4g} | {r.maximum:.4g} | {r.mean_std:.4g} | "
                     f"{r.median_kurtosis:.3g} | {r.max_kurtosis:.3g} | {r.outlier_share:.2e} |")
    lines += ["", "Excess kurtosis is 0 for a Gaussian; the last column counts entries more than 6 standard deviations "
              "from their tensor's mean. Plots: `weights_boxplots.png`, `weights_histograms.png`.", "",
              "## Router-norm change against activation frequency", ""]
    what = ("Λ = ‖final router row‖ − ‖initial router row‖" if report.router_signal == "router_norm_change"
            else "the final router norm (proxy: no initial routers were found; pass --reference)")
    lines.append(f"Signal: {what}.")
    if report.spearman is None:
        lines.append("No calibration text (and no tokenizer for the default corpus): frequency not measured.")
    else:
        lines += [f"Frequency from {report.calibration_tokens:,} calibration tokens. Spearman's ρ per layer: "
                  + ", ".join(f"{r:.2f}" for r in report.spearman) + ".", "",
                  "The paper's premise is a positive ρ (rarely used experts grow their routers least). "
                  "Plot: `router_change_vs_frequency.png`."]
    return "\n".join(lines) + "\n"
