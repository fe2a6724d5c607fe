"""Switch Transformers: encoder-decoder, top-1 router ``mlp.router.classifier``, one module per
expert (``mlp.experts.expert_{i}.wi / .wo``, not gated).

The experts module is called with a one-hot dispatch mask ``[tokens, 1, E]`` (all zero for a
token dropped by the capacity limit) and the routing probability ``[tokens, 1]``; the quantized
replacement turns that into the top-k form the shared experts runtime takes.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerStack, MoEAdapter, MoELayer, PackedExperts, TensorSource, quantized_layer, register_adapter


def dispatch_to_top_k(dispatch_mask: torch.Tensor, routing_weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch's one-hot dispatch mask ``[tokens, 1, E]`` and probabilities ``[tokens, 1]`` as
    top-1 ``(index, weight)``; a token dropped by the capacity limit gets the sentinel index ``E``."""
    mask = dispatch_mask.reshape(routing_weights.numel(), -1)
    dropped = mask.sum(dim=-1) == 0
    index = torch.where(dropped, torch.full_like(dropped, num_experts, dtype=torch.long), mask.argmax(dim=-1))
    return index[:, None], routing_weights.reshape(-1, 1)


@register_adapter
class SwitchAdapter(MoEAdapter):
    family = "switch_transformers"
    model_types = ("switch_transformers",)
    projections = ("wi", "wo")
    attention_markers = ("SelfAttention", "EncDecAttention")
    router_markers = ("classifier",)
    expert_child_name = "expert_{}"  # Switch's own names (experts.expert_3.wi)

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        layers = []
        for path, block in model.named_modules():
            router = getattr(block, "router", None)
            experts = getattr(block, "experts", None)
            if router is None or experts is None or not hasattr(router, "classifier"):
                continue
            if isinstance(experts, PackedExperts):
                layers.append(quantized_layer(len(layers), path, experts, router.classifier.weight))
                continue
            layers.append(
                MoELayer(
                    index=len(layers),
                    path=path,
                    experts_path=f"{path}.experts",
                    num_experts=router.num_experts,
                    projections=self.projections,
                    router_weight=router.classifier.weight,
                    expert_weight=lambda e, p, experts=experts: getattr(experts[f"expert_{e}"], p).weight,
                    shapes={p: tuple(getattr(experts["expert_0"], p).weight.shape) for p in self.projections},
                    dtype=experts["expert_0"].wi.weight.dtype,
                    act_fn=experts["expert_0"].act,
                    gated=False,
                )
            )
        return layers

    def routing_of_call(self, layer: MoELayer, args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, dispatch_mask, routing_weights = args[:3]
        return (hidden, *dispatch_to_top_k(dispatch_mask, routing_weights, layer.num_experts))

    def expert_sources(self, layer: MoELayer, expert: int, projection: str) -> list[TensorSource]:
        return [TensorSource(f"{layer.experts_path}.expert_{expert}.{projection}.weight")]

    @torch.no_grad()
    def fill_experts(self, experts: nn.Module, layer: MoELayer) -> None:
        for e in range(layer.num_experts):
            for p in layer.projections:
                getattr(experts[f"expert_{e}"], p).weight.copy_(layer.expert_weight(e, p))

    def layer_stacks(self, model: nn.Module) -> list[LayerStack]:
        return [
            LayerStack("encoder", "block", ("encoder.embed_tokens",), ("encoder.final_layer_norm",)),
            LayerStack("decoder", "block", ("decoder.embed_tokens",)),
        ]

    def run_stack(self, model: nn.Module, stack: LayerStack, input_ids: torch.Tensor, context: object) -> None:
        # Calibration feeds the decoder the same ids as the encoder (as the routing statistics do).
        if stack.path == "encoder":
            model.encoder(input_ids=input_ids)
        else:
            model.decoder(input_ids=input_ids, encoder_hidden_states=context, use_cache=False)

    def next_block_inputs(self, captured: tuple, output, block: nn.Module | None = None) -> tuple:
        # T5-style blocks return (hidden, self-attention bias, cross-attention bias); the first block
        # computes the position biases and the stack hands them to every later block.
        hidden, args, kwargs = captured
        mask, _, encoder_hidden, encoder_mask, cross_bias = args
        new_cross = output[2] if encoder_hidden is not None else cross_bias
        return output[0], (mask, output[1], encoder_hidden, encoder_mask, new_cross), kwargs

    def stack_context(self, model: nn.Module, stack: LayerStack, hidden: list[torch.Tensor]) -> object:
        if stack.path != "encoder":
            return None
        return [model.encoder.final_layer_norm(h) for h in hidden]

    def router_sources(self, layer: MoELayer) -> list[TensorSource]:
        return [TensorSource(f"{layer.path}.router.classifier.weight")]


__all__ = ["SwitchAdapter", "dispatch_to_top_k"]
