"""Accumulating GPTQ's Hessians ``H = Σ x xᵀ`` from the inputs each weight really sees."""

from __future__ import annotations

import torch

__all__ = ["HessianSum"]


class HessianSum:
    """``Σ x xᵀ`` over input rows ``x [in]`` and the number of rows, in float32."""

    def __init__(self, features: int) -> None:
        self.matrix = torch.zeros(features, features)
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.matrix.addmm_(x.T, x)
        self.rows += x.shape[0]
