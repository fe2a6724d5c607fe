"""What every export reads from a loaded moeq checkpoint: its weights (plain tensors, or the packed
QuantizedLinear modules) and the dense experts moeq left unquantized."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExportError", "dense_expert", "named_weights"]


class ExportError(ValueError):
    """A checkpoint or plan that cannot become the requested file."""


def dense_expert(experts: nn.Module, expert: int, projection: str) -> torch.Tensor:
    """One expert weight of a full-precision experts module (transformers 5's fused 3-D parameters)."""
    if projection in ("gate_proj", "up_proj") and hasattr(experts, "gate_up_proj"):
        gate, up = experts.gate_up_proj[expert].chunk(2, dim=0)
        return gate if projection == "gate_proj" else up
    return getattr(experts, projection)[expert]


def named_weights(model: nn.Module, modules: dict[str, nn.Module]):
    """(name, tensor) for every tensor of the state dict, except that each packed linear comes once
    as ``(its path + ".weight", the QuantizedLinear)`` in place of its codes and scales."""
    from ..modules.linear import QuantizedLinear

    quantized = {path for path, m in modules.items() if isinstance(m, QuantizedLinear)}
    for path in sorted(quantized):
        yield f"{path}.weight", modules[path]
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if any(owner == q or owner.startswith(q + ".") for q in quantized):
            continue
        yield name, tensor
