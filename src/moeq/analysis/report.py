"""``moeq analyze``: the two papers' claims about a model's weights and routers, as a report folder.

- MoQE: routed-expert weights are better behaved (fewer outliers, lower kurtosis) than dense ones
  (:mod:`.weights`).
- Expert-wise mixed precision: rarely used experts grow their routers least, i.e. the router-norm
  change Λ correlates with activation frequency. Λ comes from the initial routers shipped beside
  the checkpoint or ``reference`` (else the final-norm proxy, labelled as such); frequency from
  calibration text (default: the project's corpus when the folder has a tokenizer). Spearman's ρ
  per layer.

Writes ``report.md``, ``analysis.json`` and PNG plots (box plots of per-tensor kurtosis, outlier
share and range in σ by role, weight histograms by role, Λ against frequency per layer) into a
folder that appears complete or not at all. A layer whose Λ or frequency is constant has no rank
correlation: its ρ is recorded as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from scipy.stats import spearmanr

from ..atomic import atomic_directory
from .weights import HISTOGRAM_EDGES, RoleSummary, TensorStats, weight_statistics

__all__ = ["AnalysisReport", "analyze", "format_rho"]


@dataclass
class AnalysisReport:
    model: str
    tensors: list[TensorStats]
    roles: list[RoleSummary]
    router_signal: str  # "router_norm_change", "router_final_norm" (the proxy), or "none" (router networks, ZAYA's)
    router_change: list[list[float]]
    frequency: list[list[float]] | None
    spearman: list[float | None] | None  # per layer, Λ against frequency (None: a constant side)
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
    from ..allocate.api import open_source, router_signal, routing_statistics
    from ..atomic import ensure_output_free
    from ..plan import PlanError

    inputs = [p for p in (model_path, reference, calibration) if isinstance(p, (str, Path))]
    ensure_output_free(Path(out), overwrite, inputs)
    if calib_tokens < seq_len:
        raise ValueError(f"--calib-tokens {calib_tokens} is less than one sequence of {seq_len} tokens; pass at least {seq_len}")
    source = open_source(model_path)
    tensors, roles = weight_statistics(source.lazy)
    scores: dict = {}
    if any(layer.router_weight is None for layer in source.layers):  # router networks have no per-expert row norm
        change, signal = [], "none"
    else:
        change = router_signal(source, source.layers, reference, scores, {})
        signal = next(iter(scores))
    frequency, rho, tokens = None, None, 0
    try:
        method: dict = {}
        stats = routing_statistics(source, model_path, calibration, calib_tokens, seq_len, False, method)
        frequency = stats.frequency.tolist()
        tokens = stats.tokens
        rho = [_spearman(c, f[: len(c)]) for c, f in zip(change, frequency)] if change else None
    except PlanError:
        if calibration is not None:
            raise
        # No calibration text and no tokenizer for the default corpus: the weight statistics stand alone.
    report = AnalysisReport(str(model_path), tensors, roles, signal, change, frequency, rho, tokens)
    with atomic_directory(Path(out), overwrite=overwrite, inputs=inputs) as work:
        (work / "analysis.json").write_text(json.dumps(report.to_json(), indent=1, allow_nan=False) + "\n")
        _plots(report, work)
        (work / "report.md").write_text(_markdown(report))
    return report


def _spearman(change: list[float], frequency: list[float]) -> float | None:
    if len(set(change)) < 2 or len(set(frequency)) < 2:
        return None  # ranks of a constant are undefined
    return float(spearmanr(change, frequency).statistic)


def _plots(report: AnalysisReport, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roles = [r.role for r in report.roles]
    panels = (
        ("excess kurtosis per tensor", lambda t: t.kurtosis, 1.0),
        ("share of |w-μ| > 6σ per tensor", lambda t: t.outlier_share, 1e-4),
        ("range per tensor: max |w| / σ", lambda t: max(-t.minimum, t.maximum) / t.std if t.std else 0.0, 1.0),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (label, value, linthresh) in zip(axes, panels):
        ax.boxplot([[value(t) for t in report.tensors if t.role == role] for role in roles], tick_labels=roles)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(folder / "weights_boxplots.png", dpi=120)
    plt.close(fig)

    edges = HISTOGRAM_EDGES.numpy()
    fig, ax = plt.subplots(figsize=(7, 4))
    for summary in report.roles:
        counts = np.asarray(summary.histogram, dtype=np.float64)
        density = counts / (summary.numel * np.diff(edges))
        ax.stairs(np.where(density > 0, density, np.nan), edges, label=summary.role)
    ax.set_yscale("log")
    ax.set_xlabel("(w − μ) / σ of its tensor")
    ax.set_ylabel("density (all weights of the role)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "weights_histograms.png", dpi=120)
    plt.close(fig)

    if report.frequency is not None and report.router_change:
        layers = len(report.router_change)
        cols = min(layers, 4)
        rows = math.ceil(layers / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
        for i, (change, freq) in enumerate(zip(report.router_change, report.frequency)):
            ax = axes[i // cols][i % cols]
            ax.scatter(freq[: len(change)], change, s=14)
            ax.set_title(f"layer {i}: ρ = {format_rho(report.spearman[i])}", fontsize=9)
            ax.set_xlabel("activation frequency", fontsize=8)
            ax.set_ylabel("Λ" if report.router_signal == "router_norm_change" else "final router norm (proxy)", fontsize=8)
        for j in range(layers, rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        fig.savefig(folder / "router_change_vs_frequency.png", dpi=120)
        plt.close(fig)


def format_rho(rho: float | None) -> str:
    """ρ to two decimals, or ``n/a`` where it is undefined."""
    return "n/a" if rho is None else f"{rho:.2f}"


def _outlier_comparison(roles: list[RoleSummary]) -> list[str]:
    # MoQE compares experts with the dense weights around them; say what this model shows.
    by_role = {r.role: r for r in roles}
    experts = by_role.get("routed experts")
    lines = []
    for other in ("dense", "attention", "shared experts"):
        if experts is None or other not in by_role:
            continue
        o = by_role[other]
        fewer = experts.outlier_share < o.outlier_share
        lines.append(
            f"- routed experts against {other}: share > 6σ {experts.outlier_share:.2e} vs {o.outlier_share:.2e}, "
            f"median excess kurtosis {experts.median_kurtosis:.3g} vs {o.median_kurtosis:.3g}: experts have "
            f"{'fewer' if fewer else 'no fewer'} entries beyond 6σ."
        )
    return lines


def _markdown(report: AnalysisReport) -> str:
    lines = [f"# moeq analyze: {report.model}", "", "## Weights by layer type", "",
             "| role | tensors | weights | min | max | mean σ | median excess kurtosis | max excess kurtosis | share > 6σ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.roles:
        lines.append(f"| {r.role} | {r.tensors} | {r.numel:,} | {r.minimum:.4g} | {r.maximum:.4g} | {r.mean_std:.4g} | "
                     f"{r.median_kurtosis:.3g} | {r.max_kurtosis:.3g} | {r.outlier_share:.2e} |")
    lines += ["", ("Excess kurtosis is E[(w−μ)⁴]/σ⁴ − 3, 0 for a Gaussian (population moments per tensor); the last "
                   "column is the share of entries more than 6σ from their tensor's mean, over all entries of the role. "
                   "An output head tied to the embeddings is counted once, as embeddings. "
                   "Plots: `weights_boxplots.png`, `weights_histograms.png`."), ""]
    comparison = _outlier_comparison(report.roles)
    if comparison:
        lines += ["MoQE's claim (expert weights have fewer outliers than dense ones):", "", *comparison, ""]
    lines += ["## Router-norm change against activation frequency", ""]
    what = ("Λ = ‖final router row‖ − ‖initial router row‖" if report.router_signal == "router_norm_change"
            else "the final router norm ‖w(T)‖, a proxy: Λ is unavailable because no initial routers were found "
                 "(ship initial_router.safetensors beside the checkpoint or pass --reference)")
    if report.router_signal == "none":
        lines.append("No signal: the routers are networks of their own, with no per-expert row to take a norm of.")
        return "\n".join(lines) + "\n"
    lines.append(f"Signal: {what}.")
    if report.spearman is None:
        lines.append("No calibration text (and no tokenizer for the default corpus): frequency not measured.")
    else:
        lines += [f"Frequency: share of tokens routed to each expert (a layer's shares sum to its top-k) over {report.calibration_tokens:,} calibration tokens.", "",
                  "| MoE layer | Spearman ρ | frequency min | frequency max | signal min | signal max |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for i, (rho, change, freq) in enumerate(zip(report.spearman, report.router_change, report.frequency)):
            freq = freq[: len(change)]
            lines.append(f"| {i} | {format_rho(rho)} | {min(freq):.4g} | {max(freq):.4g} | {min(change):.4g} | {max(change):.4g} |")
        lines += ["", ("The paper's premise is a positive ρ (rarely used experts grow their routers least); n/a marks a "
                       "layer where one side is constant. Plot: `router_change_vs_frequency.png`.")]
    return "\n".join(lines) + "\n"
