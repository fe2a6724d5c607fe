"""How a layer's weights are quantized, given what calibration saw: the recipe every road shares.

Every road asks here: rounding while streaming a checkpoint, the GPTQ runner, the damage model
(which predicts what the runner will do) and QAT's fake quantization, so the rules live once:
GPTQ for an expert its router sent enough tokens; for a rarer one, the rare-expert fallback
(rounding with the clipping search, or GPTQ on every token's statistics); plain rounding when no
calibration runs or no input reached the weight; sign codes take no clipping search.

:func:`quantize_layer` is the pure per-layer step: a :class:`LayerJob` (plain, picklable data:
weights, specs, methods, Hessians, options) in, packed weights out, in the job's order. The
schedulers (the GPTQ runner's block walk, the damage model) only build jobs and place results, so
any executor can run the jobs; GPTQ weights of one spec and shape are solved together, and each
result equals that weight quantized alone (``tests/quant/test_gptq.py``), so how a scheduler
splits a layer into jobs never changes the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import TensorSpec
from ..quant.gptq import gptq_quantize_batch
from ..quant.rtn import quantize_rtn
from ..quant.schemes import Scheme
from ..quant.tensor import QuantizedTensor
from ..threads import threads_pinned

__all__ = ["GPTQOptions", "METHODS", "WeightJob", "LayerJob", "expert_method", "quantize_weight", "quantize_layer"]

METHODS = ("rtn", "gptq", "gptq-all-tokens", "rtn-clip")
_GPTQ_METHODS = ("gptq", "gptq-all-tokens")
_CLIPPED_FALLBACKS = ("rtn-clip", "gptq-all-tokens")  # rare experts: rounded with the clipping search


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's own settings: damping (share of the mean Hessian diagonal), column order, block."""

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128


def expert_method(quantizer: str, starved: bool, rare_fallback: str = "rtn") -> str:
    """The method an expert gets: ``rtn`` without calibration, ``gptq``, or for an expert below
    the token minimum ``gptq-all-tokens`` / ``rtn-clip`` by the rare-expert fallback."""
    if quantizer == "rtn":
        return "rtn"
    if not starved:
        return "gptq"
    return "gptq-all-tokens" if rare_fallback == "all-tokens" else "rtn-clip"


def quantize_weight(
    weight: torch.Tensor,
    spec: TensorSpec,
    scale_dtype: torch.dtype,
    *,
    method: str,
    hessian: torch.Tensor | None = None,
    options: GPTQOptions = GPTQOptions(),
    name: str = "weight",
) -> QuantizedTensor:
    """``weight`` quantized by ``method`` (one of :data:`METHODS`); GPTQ methods need the Hessian
    ``Σ x xᵀ`` of the weight's inputs (``None`` when no input reached it: they round instead, a
    rare expert's all-tokens fallback with the clipping search)."""
    return quantize_layer(LayerJob((WeightJob(name, weight, spec, method, hessian),), _dtype_name(scale_dtype), options))[0]


@dataclass(frozen=True)
class WeightJob:
    """One weight of a layer job: its name (for errors), values ``[out, in]``, spec, method (one of
    :data:`METHODS`) and, for GPTQ, the Hessian ``Σ x xᵀ`` of its inputs (``None``: none reached it)."""

    name: str
    weight: torch.Tensor
    spec: TensorSpec
    method: str = "rtn"
    hessian: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} for {self.name}; one of {', '.join(METHODS)}")

    @property
    def solved(self) -> bool:
        """True when GPTQ solves this weight (a GPTQ method and a Hessian), False when it is rounded."""
        return self.method in _GPTQ_METHODS and self.hessian is not None


@dataclass(frozen=True)
class LayerJob:
    """The weights of one layer (or one stage of it) to quantize, with the run's storage dtype of
    scales (by name, e.g. ``"float16"``) and GPTQ options: plain data, picklable for any executor."""

    weights: tuple[WeightJob, ...]
    scale_dtype: str = "float16"
    options: GPTQOptions = GPTQOptions()
    threads: int | None = None  # intra-op threads to compute with (the scheduler's own: the same bytes anywhere)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the job carries (weights and Hessians), for executors that size tasks."""
        return sum(w.weight.nbytes + (w.hessian.nbytes if w.hessian is not None else 0) for w in self.weights)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_layer(job: LayerJob) -> list[QuantizedTensor]:
    """The packed weights of ``job``, in its order: a pure function of the job (nothing is read or
    changed elsewhere). Weights GPTQ solves are batched by (spec, shape); the others are rounded."""
    with threads_pinned(job.threads):
        return _quantize_layer(job)


def _quantize_layer(job: LayerJob) -> list[QuantizedTensor]:
    scale_dtype = getattr(torch, job.scale_dtype)
    results: list[QuantizedTensor | None] = [None] * len(job.weights)
    batches: dict[tuple[TensorSpec, tuple[int, ...]], list[int]] = {}
    for i, item in enumerate(job.weights):
        if item.solved:
            batches.setdefault((item.spec, tuple(item.weight.shape)), []).append(i)
            continue
        spec = item.spec
        clip = spec.clip_search or (item.method in _CLIPPED_FALLBACKS and spec.scheme is not Scheme.SIGN)
        results[i] = quantize_rtn(item.weight, spec.bits, spec.scheme, spec.group_size, clip, scale_dtype, item.name)
    options = job.options
    for (spec, _), members in batches.items():
        solved = gptq_quantize_batch(
            [job.weights[i].weight for i in members], [job.weights[i].hessian for i in members],
            spec.bits, spec.scheme, spec.group_size, spec.clip_search, damp=options.damp, block_size=options.block_size,
            act_order=options.act_order, scale_dtype=scale_dtype, names=[job.weights[i].name for i in members],
        )
        for i, result in zip(members, solved):
            results[i] = result
    return results  # type: ignore[return-value]
