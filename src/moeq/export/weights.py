"""What every export reads from a loaded moeq checkpoint: its weights (plain tensors, or the packed
QuantizedLinear modules). Experts moeq left unquantized are read through the adapter's MoELayer
(``expert_weight``/``bias``), whatever layout the family stores them in."""

from __future__ import annotations

from torch import nn

__all__ = ["ExportError", "named_weights"]


class ExportError(ValueError):
    """A checkpoint or plan that cannot become the requested file."""


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
