"""Plots of bit plans (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plan import BitPlan

__all__ = ["expert_bits_matrix", "bits_heatmap"]


def expert_bits_matrix(plan: BitPlan) -> np.ndarray:
    """``[layers, experts]`` parameter-weighted mean width of each expert (NaN where unplanned)."""
    num_experts = 1 + max((e.expert for e in plan.experts), default=-1)
    total = np.zeros((len(plan.layers), num_experts))
    count = np.zeros_like(total)
    for entry in plan.experts:
        total[entry.layer, entry.expert] += entry.spec.bits
        count[entry.layer, entry.expert] += 1
    with np.errstate(invalid="ignore"):
        return total / count


def bits_heatmap(plan: BitPlan, path: str | Path, title: str | None = None) -> Path:
    """Write a layer x expert heatmap of the chosen widths to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = expert_bits_matrix(plan)
    layers, experts = matrix.shape
    fig, ax = plt.subplots(figsize=(min(2 + experts * 0.35, 24), min(1.5 + layers * 0.3, 18)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    strategy = plan.method.get("strategy", "plan")
    avg = plan.budget.get("avg_expert_bits")
    ax.set_title(title or f"{strategy}: {avg:.3g} mean expert bits" if avg is not None else strategy)
    if experts <= 64 and layers <= 64:
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        middle = np.nanmean([np.nanmin(matrix), np.nanmax(matrix)])
        for i in range(layers):
            for j in range(experts):
                if not np.isnan(matrix[i, j]):
                    colour = "black" if matrix[i, j] > middle else "white"
                    ax.text(j, i, f"{matrix[i, j]:g}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="bits")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
