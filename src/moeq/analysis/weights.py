"""Weight statistics per layer type, read one tensor at a time (MoQE's claim, tested).

MoQE (arXiv 2310.02410) reports that routed-expert weights have fewer outliers than dense
feed-forward weights, which is why experts tolerate low widths. For every weight matrix of a
checkpoint this module computes, in float64: range, standard deviation, excess kurtosis
(``E[(w-μ)⁴] / σ⁴ − 3``, 0 for a Gaussian) and the share of entries with ``|w − μ| > 6σ``
(σ of that tensor). Tensors are grouped by role: routed experts, shared experts, attention,
dense feed-forward, router, output head, embeddings. Only one tensor is in memory at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..io.lazy import LazyModel

__all__ = ["ROLE_ORDER", "TensorStats", "RoleSummary", "tensor_stats", "weight_statistics"]

ROLE_ORDER = ("routed experts", "shared experts", "attention", "dense", "router", "lm_head", "embeddings")
_ROLE_NAMES = {"shared": "shared experts", "attention": "attention", "dense": "dense", "router": "router", "lm_head": "lm_head"}
SAMPLE_PER_TENSOR = 2048  # values kept per tensor for the histograms (evenly strided)


@dataclass
class TensorStats:
    name: str
    role: str
    numel: int
    minimum: float
    maximum: float
    std: float
    kurtosis: float  # excess
    outlier_share: float  # |w - mean| > 6 std


@dataclass
class RoleSummary:
    role: str
    tensors: int
    numel: int
    minimum: float
    maximum: float
    mean_std: float
    median_kurtosis: float
    max_kurtosis: float
    outlier_share: float  # over all entries of the role
    sample: list[float] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("sample")
        return out


def tensor_stats(name: str, role: str, weight: torch.Tensor) -> TensorStats:
    """The statistics of one tensor (float64)."""
    w = weight.detach().reshape(-1).to(torch.float64)
    mean = w.mean()
    centred = w - mean
    variance = centred.pow(2).mean()
    std = float(variance.sqrt())
    kurtosis = float(centred.pow(4).mean() / variance.pow(2) - 3) if std > 0 else 0.0
    outliers = float((centred.abs() > 6 * std).double().mean()) if std > 0 else 0.0
    return TensorStats(name, role, w.numel(), float(w.min()), float(w.max()), std, kurtosis, outliers)


def _sample(weight: torch.Tensor) -> list[float]:
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE_PER_TENSOR)
    return flat[::step][:SAMPLE_PER_TENSOR].to(torch.float32).tolist()


def weight_statistics(lazy: LazyModel) -> tuple[list[TensorStats], list[RoleSummary]]:
    """Per-tensor statistics of every weight matrix, and their summary per role."""
    rows: list[TensorStats] = []
    samples: dict[str, list[float]] = {}

    def add(name: str, role: str, weight: torch.Tensor) -> None:
        rows.append(tensor_stats(name, role, weight))
        samples.setdefault(role, []).extend(_sample(weight))

    for layer in lazy.layers:
        for expert in range(layer.num_experts):
            for projection in layer.projections:
                add(f"{layer.experts_path}.{expert}.{projection}", "routed experts", layer.expert_weight(expert, projection))
    for name, role in lazy.adapter.linear_roles(lazy.skeleton).items():
        add(f"{name}.weight", _ROLE_NAMES[role], lazy.read_tensor(f"{name}.weight"))
    embeddings = lazy.skeleton.get_input_embeddings()
    path = next((n for n, m in lazy.skeleton.named_modules() if m is embeddings), None)
    if path is not None:
        add(f"{path}.weight", "embeddings", lazy.read_tensor(f"{path}.weight"))
    summaries = []
    for role in ROLE_ORDER:
        group = [r for r in rows if r.role == role]
        if not group:
            continue
        numel = sum(r.numel for r in group)
        kurtoses = sorted(r.kurtosis for r in group)
        summaries.append(RoleSummary(
            role=role, tensors=len(group), numel=numel, minimum=min(r.minimum for r in group),
            maximum=max(r.maximum for r in group), mean_std=sum(r.std for r in group) / len(group),
            median_kurtosis=kurtoses[len(kurtoses) // 2], max_kurtosis=kurtoses[-1],
            outlier_share=sum(r.outlier_share * r.numel for r in group) / numel, sample=samples[role],
        ))
    return rows, summaries
