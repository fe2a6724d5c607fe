"""Per-expert scores the allocation strategies rank or optimise (PAPERS.md §1), from weights only.

- ``router_norm_change``: ``Λ_s = ‖w_s(T)‖₂ − ‖w_s(0)‖₂``, a difference of norms of expert s's
  router row ``[hidden]``, after (T) and before (0) training or fine-tuning. With no reference
  checkpoint the final norm ``‖w_s(T)‖₂`` stands in (the paper's proxy; recorded in the plan).
- ``max_var``: for the expert's first weight ``W1 [m, d]`` (the gate projection of a gated
  expert), the variance of each neuron's ``d`` input weights, maxed over the ``m`` neurons. The
  paper's default uses the population variance; the authors' Mixtral code instead takes the
  unbiased variance of the single row with the largest l2 norm (``variant="authors"``).
- ``quantization_error``: ``‖W − Q_b(W)‖²_F`` of one weight at a candidate width, optionally
  weighted by the mean squared input of each input channel (``Σ_ij d_j (W − Q(W))_ij²``, the
  expected squared output error for inputs with second moments ``d``).
"""

from __future__ import annotations

import torch

from ..plan import TensorSpec
from ..quant.rtn import quantize_rtn

__all__ = ["router_norms", "router_norm_change", "max_var", "quantization_error", "MAXVAR_VARIANTS"]

MAXVAR_VARIANTS = ("paper", "authors")


def router_norms(router_weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every expert's router row, float64 ``[num_experts]``."""
    return router_weight.detach().to(torch.float64).norm(dim=-1)


def router_norm_change(final: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """Λ per expert: ``‖final row‖ − ‖initial row‖``, or the final norm alone when ``initial`` is None."""
    if initial is None:
        return router_norms(final)
    if initial.shape != final.shape:
        raise ValueError(
            f"reference router has shape {tuple(initial.shape)}, the model's is {tuple(final.shape)}; "
            "the reference must be the same architecture (its initial or pre-trained checkpoint)"
        )
    return router_norms(final) - router_norms(initial)


def max_var(first_weight: torch.Tensor, variant: str = "paper", rows_per_chunk: int = 1024) -> float:
    """MaxVar of an expert from its first weight ``W1 [neurons, inputs]``.

    Computed in float64 over chunks of rows, so the extra memory is one chunk, not a copy of W1.
    """
    if variant not in MAXVAR_VARIANTS:
        raise ValueError(f"unknown MaxVar variant {variant!r}; choose one of: {', '.join(MAXVAR_VARIANTS)}")
    best_var, best_norm, widest_row_var = -1.0, -1.0, 0.0
    for chunk in first_weight.detach().split(rows_per_chunk):
        chunk = chunk.to(torch.float64)
        if variant == "paper":
            best_var = max(best_var, float(chunk.var(dim=1, correction=0).max()))
            continue
        norms = chunk.norm(dim=1)
        row = int(norms.argmax())
        if float(norms[row]) > best_norm:  # the first row with the largest norm, as argmax would pick
            best_norm, widest_row_var = float(norms[row]), float(chunk[row].var(correction=1))
    return best_var if variant == "paper" else widest_row_var


def quantization_error(weight: torch.Tensor, spec: TensorSpec, input_second_moment: torch.Tensor | None = None) -> float:
    """Squared (optionally input-weighted) Frobenius error of round-to-nearest at ``spec``."""
    w = weight.detach().to(torch.float32)
    q = quantize_rtn(w, spec.bits, spec.scheme, spec.group_size, spec.clip_search).dequantize(torch.float32)
    squared = (w - q).pow(2)
    if input_second_moment is not None:
        squared = squared * input_second_moment.to(torch.float32)[None, :]
    return float(squared.sum(dtype=torch.float64))
