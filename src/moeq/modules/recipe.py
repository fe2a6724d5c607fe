"""How one expert weight is quantized, given what calibration saw: the recipe every road shares.

Every road asks here: rounding while streaming a checkpoint, the GPTQ runner, the damage model
(which predicts what the runner will do) and QAT's fake quantization, so the rules live once: GPTQ for an expert its router sent enough tokens; for a rarer one, the
rare-expert fallback (rounding with the clipping search, or GPTQ on every token's statistics);
plain rounding when no calibration runs; sign codes take no clipping search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import TensorSpec
from ..quant.gptq import gptq_quantize
from ..quant.rtn import quantize_rtn
from ..quant.schemes import Scheme
from ..quant.tensor import QuantizedTensor

__all__ = ["GPTQOptions", "METHODS", "expert_method", "quantize_weight"]

METHODS = ("rtn", "gptq", "gptq-all-tokens", "rtn-clip")


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
    ``Σ x xᵀ`` of the weight's inputs (``None`` when no input reached it: they round instead)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if method in ("gptq", "gptq-all-tokens") and hessian is not None:
        return gptq_quantize(
            weight, hessian, spec.bits, spec.scheme, spec.group_size, spec.clip_search,
            damp=options.damp, block_size=options.block_size, act_order=options.act_order, scale_dtype=scale_dtype, name=name,
        )
    clip = spec.clip_search or (method == "rtn-clip" and spec.scheme is not Scheme.SIGN)
    return quantize_rtn(weight, spec.bits, spec.scheme, spec.group_size, clip, scale_dtype, name)
