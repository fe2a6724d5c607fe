"""QuantizedExperts: all routed experts of one MoE layer, packed, with a width per expert and projection.

Why a module of per-expert buffers and not one 3-D tensor: experts of one layer have different
widths, so their packed codes have different lengths; a ``[E, ...]`` tensor would force one
width per layer (the limit of llama.cpp, vLLM and SGLang that this project exists to lift).
Children are named by expert index, so the checkpoint keys read
``model.layers.3.mlp.experts.7.down_proj.codes``: the expert index is in every name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels import moe_experts_forward
from ..kernels.dispatch import check_backend
from ..plan import PlanError, TensorSpec
from .linear import QuantizedLinear

__all__ = ["QuantizedExperts", "use_backend"]


class QuantizedExperts(nn.Module):
    """Drop-in replacement for a family's experts module: ``(hidden, top_k_index, top_k_weights) -> out``.

    Args:
        num_experts: routed experts in the layer.
        shapes: ``{projection: (out, in)}``, in call order (gate, up, down or up, down).
        specs: ``{(expert, projection): TensorSpec}``; every pair must be present.
        act_fn: the experts' activation.
        gated: ``down(act(gate x) * up x)`` if True, else ``down(act(up x))``.
        scale_dtype: storage dtype of the scales; dtype: the original weights' dtype.
        child_name: how expert i's submodule is named (a family may keep its own, e.g. ``expert_{}``).
        biased: every projection keeps a full-precision bias (transformers' ``has_bias`` experts, gpt-oss).
    """

    backend = "auto"  # see moeq.kernels.moe_experts_forward; "reference" runs the torch ground truth

    def __init__(
        self,
        num_experts: int,
        shapes: dict[str, tuple[int, int]],
        specs: dict[tuple[int, str], TensorSpec],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        gated: bool,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype | None = None,
        child_name: str = "{}",
        biased: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.gated, self.act_fn, self.child_name, self.biased = num_experts, gated, act_fn, child_name, biased
        self.projections = tuple(shapes)
        missing = [(e, p) for e in range(num_experts) for p in self.projections if (e, p) not in specs]
        if missing:
            raise PlanError(
                f"the plan leaves {len(missing)} expert projections of this layer unplanned (first: expert "
                f"{missing[0][0]} {missing[0][1]}); a quantized layer needs every routed expert planned"
            )
        for expert in range(num_experts):
            self.add_module(
                self.child_name.format(expert),
                nn.ModuleDict(
                    {
                        proj: QuantizedLinear(shape[1], shape[0], specs[(expert, proj)], scale_dtype, bias=biased, dtype=dtype)
                        for proj, shape in shapes.items()
                    }
                ),
            )

    def expert(self, index: int) -> nn.ModuleDict:
        return self.get_submodule(self.child_name.format(index))

    def __getitem__(self, name: str) -> nn.ModuleDict:
        return self.get_submodule(name)

    def dequantized_weights(self, expert: int, dtype: torch.dtype) -> list[torch.Tensor]:
        linears = self.expert(expert)
        return [linears[p].weight_for(dtype) for p in self.projections]

    def biases(self, expert: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """One expert's bias per projection in ``dtype`` (None for experts without biases)."""
        linears = self.expert(expert)
        return [None if linears[p].bias is None else linears[p].bias.to(dtype) for p in self.projections]

    def kernel_copy_nbytes(self) -> int:
        """Bytes of the backends' copies built at first use beside the packed buffers: the Triton
        layout (``triton``) and the int4 copy (``cpu-int4``); not part of the checkpoint."""
        layouts = getattr(self, "_kernel_layouts", None)
        triton_bytes = sum(layout.nbytes for layout in layouts[1]) if layouts else 0
        return triton_bytes + sum(weight.nbytes for weight in getattr(self, "_int4_weights", {}).values())

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return moe_experts_forward(hidden_states, top_k_index, top_k_weights, self, self.backend)


def use_backend(model: nn.Module, backend: str) -> int:
    """Run every ``QuantizedExperts`` of ``model`` on ``backend`` (see :data:`moeq.kernels.BACKENDS`);
    returns how many layers it set."""
    check_backend(backend)
    layers = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


class SwitchQuantizedExperts(QuantizedExperts):
    """QuantizedExperts called with Switch's dispatch mask instead of top-k indices.

    Experts keep Switch's names (``experts.expert_3.wi``), so code that indexes
    ``experts["expert_3"]``, such as transformers' weight initialisation, still works.
    """

    def forward(self, hidden_states: torch.Tensor, dispatch_mask: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        from ..models.switch import dispatch_to_top_k

        index, weights = dispatch_to_top_k(dispatch_mask, routing_weights, self.num_experts)
        return super().forward(hidden_states, index, weights)


# Families whose experts module is called differently from transformers 5's fused experts.
EXPERTS_CLASSES: dict[str, type[QuantizedExperts]] = {"switch_transformers": SwitchQuantizedExperts}


def quantized_experts_for(adapter, layer, specs: dict, scale_dtype: torch.dtype) -> QuantizedExperts:
    """An empty quantized replacement of ``layer``'s experts module (as ``adapter`` describes it)
    whose buffers match ``specs``, named as the family names its experts."""
    return EXPERTS_CLASSES.get(adapter.family, QuantizedExperts)(
        num_experts=layer.num_experts, shapes=layer.shapes, specs=specs, act_fn=layer.act_fn, gated=layer.gated,
        scale_dtype=scale_dtype, dtype=layer.dtype, child_name=adapter.expert_child_name, biased=layer.expert_bias is not None,
    )
