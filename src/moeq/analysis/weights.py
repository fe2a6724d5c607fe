"""Weight statistics per layer type, read one tensor at a time (MoQE's claim, tested).

MoQE (arXiv 2310.02410) reports that routed-expert weights have fewer outliers than dense
feed-forward weights, which is why experts tolerate low widths. For every weight matrix of a
checkpoint this module computes, in float64: range, standard deviation, excess kurtosis
(``E[(w-μ)⁴] / σ⁴ − 3``, 0 for a Gaussian) and the share of entries with ``|w − μ| > 6σ``
(μ, σ of that tensor, population moments). Tensors are grouped by role: routed experts, shared
experts, attention, dense feed-forward, routers, output head, embeddings; an output head tied to
the embeddings is counted once, as embeddings.

Only one tensor is in memory at a time, and its float64 moments are taken over fixed-size chunks
(three passes: mean and range; central moments; outliers and histogram), so the extra memory is
one chunk, not float64 copies of a large embedding. Per role, a histogram of ``(w − μ)/σ`` over
fixed bins is accumulated as tensors stream past, instead of keeping samples of every tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..io.lazy import LazyModel

__all__ = ["HISTOGRAM_EDGES", "ROLE_ORDER", "RoleSummary", "TensorStats", "tensor_stats", "weight_statistics"]

ROLE_ORDER = ("routed experts", "shared experts", "attention", "dense", "router", "lm_head", "embeddings")
_ROLE_NAMES = {"shared": "shared experts", "attention": "attention", "dense": "dense", "router": "router", "lm_head": "lm_head"}
OUTLIER_SIGMAS = 6.0
HISTOGRAM_EDGES = torch.linspace(-12.0, 12.0, 241, dtype=torch.float64)  # in σ of each tensor; tails beyond are not binned
_CHUNK = 1 << 22  # entries per float64 chunk (32 MiB)


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
    histogram: list[int] = field(default_factory=list, repr=False)  # counts over HISTOGRAM_EDGES

    def to_json(self) -> dict:
        return asdict(self)


def _chunks(weight: torch.Tensor):
    for chunk in weight.detach().reshape(-1).split(_CHUNK):
        yield chunk.to(torch.float64)


def tensor_stats(name: str, role: str, weight: torch.Tensor, histogram: torch.Tensor | None = None) -> TensorStats:
    """The statistics of one tensor (float64, population moments).

    If ``histogram`` (float64, ``len(HISTOGRAM_EDGES) - 1`` bins) is given, the counts of
    ``(w − μ)/σ`` per bin are added into it.
    """
    numel = weight.numel()
    total, low, high = 0.0, float("inf"), float("-inf")
    for chunk in _chunks(weight):
        total += float(chunk.sum())
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    mean = total / numel
    second = fourth = 0.0
    for chunk in _chunks(weight):
        squared = (chunk - mean).pow_(2)
        second += float(squared.sum())
        fourth += float(squared.pow_(2).sum())
    variance = second / numel
    std = variance**0.5
    if std == 0:
        return TensorStats(name, role, numel, low, high, 0.0, 0.0, 0.0)
    outliers = 0
    for chunk in _chunks(weight):
        standard = (chunk - mean) / std
        outliers += int((standard.abs() > OUTLIER_SIGMAS).sum())
        if histogram is not None:
            histogram += torch.histogram(standard, HISTOGRAM_EDGES).hist
    kurtosis = fourth / numel / variance**2 - 3
    return TensorStats(name, role, numel, low, high, std, kurtosis, outliers / numel)


def weight_statistics(lazy: LazyModel) -> tuple[list[TensorStats], list[RoleSummary]]:
    """Per-tensor statistics of every weight matrix, and their summary per role."""
    rows: list[TensorStats] = []
    histograms: dict[str, torch.Tensor] = {}

    def add(name: str, role: str, weight: torch.Tensor) -> None:
        histogram = histograms.setdefault(role, torch.zeros(len(HISTOGRAM_EDGES) - 1, dtype=torch.float64))
        rows.append(tensor_stats(name, role, weight, histogram))

    routers = set()
    for layer in lazy.layers:
        for expert in range(layer.num_experts):
            for projection in layer.projections:
                add(f"{layer.experts_path}.{expert}.{projection}", "routed experts", layer.expert_weight(expert, projection))
        # Routers are not an nn.Linear in every family: take them from the MoE layers (a router that
        # is a network of its own has its linears among the router-role linears below).
        if layer.router_weight is None:
            continue
        key = next((s.key for s in lazy.adapter.router_sources(layer) if s.key in lazy.reader), f"{layer.path} router")
        add(key, "router", layer.router_weight)
        routers.add(key)
    tied = getattr(lazy.skeleton, "all_tied_weights_keys", None) or {}
    for name, role in lazy.adapter.linear_roles(lazy.skeleton).items():
        if f"{name}.weight" not in routers and f"{name}.weight" not in tied:
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
            outlier_share=sum(r.outlier_share * r.numel for r in group) / numel,
            histogram=[int(c) for c in histograms[role].tolist()],
        ))
    return rows, summaries
