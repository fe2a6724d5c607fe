"""Architecture adapters: where the MoE layers, routers, experts and other linears of a model are.

The rest of moeq sees a model only through an adapter: a list of :class:`MoELayer` (the router
weight ``[E, hidden]``, every routed expert as ``(expert, projection) -> 2-D weight``, the shared
experts) and a role for every other linear (attention, dense, shared, router, lm_head). How a
family stores its experts, as transformers 5's fused 3-D parameters or as one module per expert,
stays inside its adapter, which also builds the quantized replacement for its experts module.

Adapters are data where they can be: :class:`FusedExpertsAdapter` serves every family whose
experts are transformers 5's fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, and a
family file only names its model types and where its shared experts are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn


__all__ = [
    "auto_model_class",
    "AdapterError",
    "TensorSource",
    "DerivedTensor",
    "LinearRole",
    "MoELayer",
    "MoEAdapter",
    "FusedExpertsAdapter",
    "register_adapter",
    "get_adapter",
    "supported_model_types",
]


class AdapterError(ValueError):
    """The model is not a supported MoE model."""


class LinearRole:
    """Roles of the linears that are not routed experts (strings, so plans stay plain JSON)."""

    ATTENTION = "attention"
    SHARED = "shared"
    DENSE = "dense"
    ROUTER = "router"
    LM_HEAD = "lm_head"
    ALL = (ATTENTION, SHARED, DENSE, ROUTER, LM_HEAD)


def auto_model_class(config) -> type:
    """The transformers auto class that builds ``config``'s model: encoder-decoders (Switch) are
    sequence-to-sequence, every other supported family a causal LM. A causal LM that transformers
    ships but leaves out of its auto mapping (Mistral 4) is registered there first, so that
    ``AutoModelForCausalLM.from_pretrained`` reads it too."""
    import transformers

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    auto = transformers.AutoModelForCausalLM
    if type(config) not in auto._model_mapping:
        cls = _causal_lm_class(config)
        if cls is not None:
            auto.register(type(config), cls, exist_ok=True)
    return auto


def _causal_lm_class(config) -> type | None:
    """The ``...ForCausalLM`` class transformers defines for ``config``'s class, if any."""
    import importlib

    try:
        module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    names = list(getattr(config, "architectures", None) or []) + sorted(vars(module))
    for name in names:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and name.endswith("ForCausalLM") and getattr(cls, "config_class", None) is type(config):
            return cls
    return None


@runtime_checkable
class PackedExperts(Protocol):
    """What adapters need of an already quantized experts module (moeq.modules' QuantizedExperts):
    adapters describe models and never import the modules that pack them."""

    num_experts: int
    projections: tuple[str, ...]
    gated: bool
    biased: bool

    def expert(self, index: int) -> nn.ModuleDict: ...


@dataclass
class MoELayer:
    """One MoE block of a model, as the rest of moeq sees it."""

    index: int
    path: str  # module path of the MoE block, e.g. "model.layers.3.mlp"
    experts_path: str  # module path of its routed-experts module
    num_experts: int
    projections: tuple[str, ...]
    router_weight: torch.Tensor | None  # [num_experts, hidden]; None: a router that is not one matrix (see router_path)
    expert_weight: Callable[[int, str], torch.Tensor]  # (expert, projection) -> 2-D weight
    shapes: dict[str, tuple[int, int]]  # projection -> (out, in), the same for every expert
    dtype: torch.dtype  # of the stored expert weights
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    gated: bool  # down(act(gate x) * up x) if True, else down(act(up x)); projections in that order
    shared_paths: list[str] = field(default_factory=list)
    router_name: str | None = None  # the router weight's name inside the block, e.g. "gate.weight"
    transposed: bool = False  # the experts module stores its weights [E, in, out] (transformers' is_transposed)
    interleaved: bool = False  # gate and up alternate along gate_up_proj's 2I axis (gpt-oss: is_concatenated False)
    expert_bias: Callable[[int, str], torch.Tensor] | None = None  # (expert, projection) -> [out]; None: no biases
    router_path: str | None = None  # a router module with no [E, hidden] matrix (ZAYA's MLP): its path, kept whole

    def bias(self, expert: int, projection: str) -> torch.Tensor | None:
        """One expert projection's bias (kept in full precision beside its packed weight), or None."""
        return None if self.expert_bias is None else self.expert_bias(expert, projection)

    def expert_weights(self) -> dict[tuple[int, str], torch.Tensor]:
        """Every expert weight (for a checkpoint read lazily, this reads them all)."""
        return {(e, p): self.expert_weight(e, p) for e in range(self.num_experts) for p in self.projections}

    @property
    def expert_numel(self) -> int:
        """Weights in one expert (all projections)."""
        return sum(out * inp for out, inp in self.shapes.values())


@dataclass(frozen=True)
class LayerStack:
    """A run of blocks that calibration walks one at a time (a decoder, or an encoder then a decoder)."""

    path: str  # the stack module, e.g. "model", "encoder"
    blocks: str  # its attribute holding the blocks, e.g. "layers", "block"
    inputs: tuple[str, ...]  # modules needed to compute the first block's inputs (embeddings)
    outputs: tuple[str, ...] = ()  # modules applied after the last block (e.g. a final norm)


@dataclass(frozen=True)
class TensorSource:
    """Where a weight lives in a checkpoint: a tensor name, an index into it (``()`` = all), and
    whether the indexed part is stored transposed (``[in, out]``: read back as ``[out, in]``)."""

    key: str
    index: tuple = ()
    transposed: bool = False


@dataclass(frozen=True)
class DerivedTensor:
    """A model tensor transformers builds on load from checkpoint tensors (concatenated, re-ordered):
    their names on disk, in order, and the function that builds it from them."""

    sources: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor]


class MoEAdapter:
    """Base class of the per-family adapters; subclasses register with :func:`register_adapter`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    projections: ClassVar[tuple[str, ...]]
    attention_markers: ClassVar[tuple[str, ...]] = ("self_attn",)
    shared_markers: ClassVar[tuple[str, ...]] = ()
    router_markers: ClassVar[tuple[str, ...]] = ("gate",)  # last path component of a router linear
    expert_child_name: ClassVar[str] = "{}"  # how expert i's module is named inside the experts module
    # On-disk spellings that differ from the in-memory module paths: (in memory, on disk) pairs.
    disk_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def expert_sources(self, layer: MoELayer, expert: int, projection: str) -> list[TensorSource]:
        """Candidate checkpoint locations of one expert weight, in order of preference."""
        raise NotImplementedError

    def router_sources(self, layer: MoELayer) -> list[TensorSource]:
        raise NotImplementedError

    def routing_of_call(self, layer: MoELayer, args: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden [tokens, H], top_k_index, top_k_weights)`` from the arguments the family's
        experts module is called with (transformers 5's fused experts take exactly these)."""
        hidden, index, weights = args[:3]
        return hidden, index, weights

    def fill_experts(self, experts: nn.Module, layer: MoELayer) -> None:
        """Copy every expert weight of ``layer`` (e.g. read lazily) into a materialized experts module."""
        raise NotImplementedError

    # Walking the model block by block (calibration). Defaults fit decoder-only models whose body
    # (``base_model_prefix``) holds ``embed_tokens``, ``layers`` and a rotary embedding.

    def layer_stacks(self, model: nn.Module) -> list[LayerStack]:
        base = getattr(model, "base_model_prefix", "model")
        body = getattr(model, base, None)
        if body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
            raise ValueError(f"{model.config.model_type}: no decoder body with embed_tokens and layers to calibrate through")
        return [LayerStack(base, "layers", (f"{base}.embed_tokens",))]

    def run_stack(self, model: nn.Module, stack: LayerStack, input_ids: torch.Tensor, context: object) -> None:
        """Call the stack on a batch (its first block is a catcher that stops the call)."""
        body = model.get_submodule(stack.path)
        rotary = getattr(body, "rotary_emb", None)
        if rotary is not None and any(b.is_meta for b in rotary.buffers()):
            body.rotary_emb = type(rotary)(config=model.config)  # computed buffers, not stored
        body(input_ids=input_ids, use_cache=False)

    def next_block_inputs(self, captured: tuple, output, block: nn.Module | None = None) -> tuple:
        """The next block's ``(hidden, args, kwargs)`` from this block's inputs and output (``block``: the block that ran)."""
        hidden = output[0] if isinstance(output, tuple) else output
        return hidden, captured[1], captured[2]

    def stack_context(self, model: nn.Module, stack: LayerStack, hidden: list[torch.Tensor]) -> object:
        """What the next stack needs from this one (per batch), after ``stack.outputs`` are applied."""
        return None

    def loaded_names(self, keys: list[str]) -> dict[str, str | DerivedTensor]:
        """The model's names of a checkpoint's tensors ``keys`` where loading renames them (``{model
        name: disk name}``) or builds them from several (:class:`DerivedTensor`); none by default."""
        return {}

    def tensor_sources(self, key: str) -> list[TensorSource]:
        """Candidate checkpoint names of a non-expert tensor (its module path, then renamed ones)."""
        return self._with_renames([TensorSource(key)])

    def _with_renames(self, sources: list[TensorSource]) -> list[TensorSource]:
        out = list(sources)
        for memory, disk in self.disk_renames:
            out += [replace(s, key=s.key.replace(memory, disk)) for s in sources if memory in s.key]
        return out

    def quantized_path(self, layer: MoELayer, expert: int, projection: str) -> str:
        """Module path of one expert projection once quantized (its tensors are ``<path>.codes`` etc.)."""
        return f"{layer.experts_path}.{self.expert_child_name.format(expert)}.{projection}"

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        raise NotImplementedError

    def linear_roles(self, model: nn.Module) -> dict[str, str]:
        """``{module path: role}`` for every ``nn.Linear`` outside the routed experts (those inside a
        router module are the router's)."""
        layers = self.moe_layers(model)
        expert_prefixes = tuple(layer.experts_path + "." for layer in layers)
        router_prefixes = tuple(layer.router_path + "." for layer in layers if layer.router_path)
        out_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        roles = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or name.startswith(expert_prefixes):
                continue
            parts = name.split(".")
            if module is out_embeddings:
                roles[name] = LinearRole.LM_HEAD
            elif parts[-1] in self.router_markers or name.startswith(router_prefixes):
                roles[name] = LinearRole.ROUTER
            elif any(p in self.shared_markers for p in parts):
                roles[name] = LinearRole.SHARED
            elif any(p in self.attention_markers for p in parts):
                roles[name] = LinearRole.ATTENTION
            else:
                roles[name] = LinearRole.DENSE
        return roles


class FusedExpertsAdapter(MoEAdapter):
    """Families whose routed experts are transformers 5's fused 3-D ``gate_up_proj``/``down_proj``.

    The gate and up halves of ``gate_up_proj[e]`` are separate projections (``gate_proj`` rows
    ``[:I]``, ``up_proj`` rows ``[I:]``), so each can get its own width.
    """

    projections = ("gate_proj", "up_proj", "down_proj")

    def router_weight(self, block: nn.Module, experts: nn.Module) -> torch.Tensor | None:
        """The router weight ``[experts, hidden]`` of an MoE block (``None``: not an MoE block)."""
        router = getattr(block, "gate", None)
        return None if router is None else router.weight

    def router_module(self, block: nn.Module) -> str | None:
        """The name of a router module beside the experts that holds no ``[experts, hidden]`` matrix
        (a small network of its own); ``None`` by default: every named family's router is a matrix."""
        return None

    def check_experts(self, path: str, experts: nn.Module) -> None:
        """Refuse, in one line, an experts module this adapter cannot read (the named families' are known)."""

    def experts_activation(self, experts: nn.Module) -> Callable:
        """What the layer applies between its projections (the experts' ``act_fn`` here)."""
        return experts.act_fn

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        layers, routerless = [], []
        for path, block in model.named_modules():
            experts = getattr(block, "experts", None)
            if experts is None or not (isinstance(experts, PackedExperts) or hasattr(experts, "gate_up_proj") or _ungated(experts)):
                continue
            if not isinstance(experts, PackedExperts):
                self.check_experts(f"{path}.experts", experts)
            router = self.router_weight(block, experts)
            opaque = self.router_module(block) if router is None else None
            if router is None and opaque is None:
                routerless.append(f"{path}.experts")
                continue
            router_name = None if router is None else next((n for n, p in block.named_parameters() if p is router or p is router._base), None)
            if isinstance(experts, PackedExperts):
                layer = quantized_layer(len(layers), path, experts, router)
                layer.router_name = router_name
                layer.router_path = f"{path}.{opaque}" if opaque else None
                layers.append(layer)
                continue
            hidden, intermediate = experts_dims(experts)
            gated = not _ungated(experts)
            first = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden)} if gated else {"up_proj": (intermediate, hidden)}
            layers.append(
                MoELayer(
                    index=len(layers),
                    path=path,
                    experts_path=f"{path}.experts",
                    num_experts=experts.down_proj.shape[0],
                    projections=self.projections if gated else ("up_proj", "down_proj"),
                    router_weight=router,
                    expert_weight=_fused_expert_weight(experts),
                    shapes={**first, "down_proj": (hidden, intermediate)},
                    dtype=experts.down_proj.dtype,
                    act_fn=self.experts_activation(experts),
                    gated=gated,
                    shared_paths=[f"{path}.{m}" for m in self.shared_markers if hasattr(block, m)],
                    router_name=router_name,
                    transposed=_transposed(experts),
                    interleaved=_interleaved(experts),
                    router_path=f"{path}.{opaque}" if opaque else None,
                    expert_bias=_fused_expert_bias(experts) if _biased(experts) else None,
                )
            )
        if layers and routerless:  # quantizing the others alone would leave these in full precision unsaid
            raise AdapterError(
                f"{routerless[0]} ({len(routerless)} experts module(s) in all) has no router moeq can find beside it (an "
                f"[experts, hidden] weight in a child 'gate' or 'router'), while {len(layers)} other MoE blocks have one; "
                "moeq will not quantize part of the model's experts"
            )
        return layers

    # Per-expert names used by checkpoints that predate the fused layout (e.g. Mixtral's w1/w3/w2).
    disk_projection_names: ClassVar[dict[str, str]] = {}

    def expert_sources(self, layer: MoELayer, expert: int, projection: str) -> list[TensorSource]:
        if not layer.gated:  # up_proj [E, I, H] and down_proj [E, H, I]
            return self._with_renames([TensorSource(f"{layer.experts_path}.{projection}", (expert,), layer.transposed),
                                       TensorSource(f"{layer.experts_path}.{expert}.{projection}.weight")])
        half = gate_up_halves(layer.shapes["gate_proj"][0], layer.interleaved).get(projection)
        if projection == "down_proj":
            fused = TensorSource(f"{layer.experts_path}.down_proj", (expert,), layer.transposed)
        else:  # stored [E, 2I, H], or transposed [E, H, 2I]
            fused = TensorSource(f"{layer.experts_path}.gate_up_proj", (expert, slice(None), half) if layer.transposed else (expert, half),
                                 layer.transposed)
        names = {projection, self.disk_projection_names.get(projection, projection)}
        per_expert = [TensorSource(f"{layer.experts_path}.{expert}.{name}.weight") for name in sorted(names)]
        return self._with_renames([fused, *per_expert])

    def bias_sources(self, layer: MoELayer, expert: int, projection: str) -> list[TensorSource]:
        """Candidate checkpoint locations of one expert projection's bias (``layer.expert_bias`` set)."""
        if projection in ("gate_proj", "up_proj") and layer.gated:
            half = gate_up_halves(layer.shapes["gate_proj"][0], layer.interleaved)[projection]
            fused = TensorSource(f"{layer.experts_path}.gate_up_proj_bias", (expert, half))
        else:
            fused = TensorSource(f"{layer.experts_path}.{projection}_bias", (expert,))
        return self._with_renames([fused, TensorSource(f"{layer.experts_path}.{expert}.{projection}.bias")])

    def router_sources(self, layer: MoELayer) -> list[TensorSource]:
        return self._with_renames([TensorSource(f"{layer.path}.gate.weight")])

    @torch.no_grad()
    def fill_experts(self, experts: nn.Module, layer: MoELayer) -> None:
        stored = _fused_expert_weight(experts)  # views into the module's own parameters
        biases = _fused_expert_bias(experts) if _biased(experts) else None
        if (biases is None) != (layer.expert_bias is None):
            raise AdapterError(f"{layer.experts_path}: the experts module {'has' if biases is not None else 'has no'} biases, "
                               "the weights given to it do not agree")
        for e in range(layer.num_experts):
            for projection in layer.projections:
                stored(e, projection).copy_(layer.expert_weight(e, projection))
                if biases is not None:
                    biases(e, projection).copy_(layer.bias(e, projection))


def quantized_layer(index: int, path: str, experts: PackedExperts, router_weight: torch.Tensor | None, shared=()) -> MoELayer:
    """The MoELayer view of an already quantized layer (expert weights come back dequantized)."""
    first = experts.expert(0)
    biased = getattr(experts, "biased", False)
    return MoELayer(
        index=index,
        path=path,
        experts_path=f"{path}.experts",
        num_experts=experts.num_experts,
        projections=experts.projections,
        router_weight=router_weight,
        expert_weight=lambda e, p: experts.expert(e)[p].weight,
        shapes={p: (first[p].out_features, first[p].in_features) for p in experts.projections},
        dtype=first[experts.projections[0]].weight_dtype,
        act_fn=experts.act_fn,
        gated=experts.gated,
        shared_paths=list(shared),
        expert_bias=(lambda e, p: experts.expert(e)[p].bias) if biased else None,
    )


def _ungated(experts: nn.Module) -> bool:
    """transformers 5's non-gated experts (``has_gate = False``): ``up_proj [E, I, H]`` and ``down_proj [E, H, I]``."""
    return getattr(experts, "has_gate", True) is False and isinstance(getattr(experts, "up_proj", None), torch.Tensor)


def _transposed(experts: nn.Module) -> bool:
    return bool(getattr(experts, "is_transposed", False))


def _interleaved(experts: nn.Module) -> bool:
    """gpt-oss's layout (``is_concatenated = False``): gate and up rows alternate in ``gate_up_proj``."""
    return getattr(experts, "is_concatenated", True) is False


BIAS_NAMES = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")  # transformers 5's experts interface (has_bias)


def _biased(experts: nn.Module) -> bool:
    return any(isinstance(getattr(experts, name, None), torch.Tensor) for name in BIAS_NAMES)


def gate_up_halves(intermediate: int, interleaved: bool) -> dict[str, slice]:
    """Where gate and up sit along a fused ``gate_up_proj``'s ``2I`` axis: halves, or alternating rows."""
    if interleaved:
        return {"gate_proj": slice(0, 2 * intermediate, 2), "up_proj": slice(1, 2 * intermediate, 2)}
    return {"gate_proj": slice(0, intermediate), "up_proj": slice(intermediate, 2 * intermediate)}


def experts_dims(experts: nn.Module) -> tuple[int, int]:
    """(hidden size, expert width) from ``down_proj``: ``[E, H, I]``, or ``[E, I, H]`` stored transposed."""
    _, rows, cols = experts.down_proj.shape
    return (cols, rows) if _transposed(experts) else (rows, cols)


def _fused_expert_weight(experts: nn.Module) -> Callable[[int, str], torch.Tensor]:
    """``(expert, projection) -> [out, in]`` view of the module's own parameter (transposed back
    when the module stores ``[in, out]``)."""
    def weight(expert: int, projection: str) -> torch.Tensor:
        _, intermediate = experts_dims(experts)
        if _ungated(experts) and projection in ("up_proj", "down_proj"):
            stored = getattr(experts, projection)[expert]
        elif projection in ("gate_proj", "up_proj"):
            half = gate_up_halves(intermediate, _interleaved(experts))[projection]
            stored = experts.gate_up_proj[expert][:, half] if _transposed(experts) else experts.gate_up_proj[expert, half]
        elif projection == "down_proj":
            stored = experts.down_proj[expert]
        else:
            raise KeyError(f"fused experts have projections gate_proj, up_proj, down_proj, not {projection!r}")
        return stored.T if _transposed(experts) else stored

    return weight


def _fused_expert_bias(experts: nn.Module) -> Callable[[int, str], torch.Tensor]:
    """``(expert, projection) -> [out]`` view of the module's own bias parameters."""
    def bias(expert: int, projection: str) -> torch.Tensor:
        if projection in ("gate_proj", "up_proj") and not _ungated(experts):
            half = gate_up_halves(experts_dims(experts)[1], _interleaved(experts))[projection]
            return experts.gate_up_proj_bias[expert, half]
        return getattr(experts, f"{projection}_bias")[expert]

    return bias


_REGISTRY: dict[str, MoEAdapter] = {}


def register_adapter(cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Class decorator: make ``cls`` the adapter for its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls()
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


_FALLBACK: list[Callable[[str | None], MoEAdapter]] = []  # the structural adapter's, for model types no family names


def register_fallback(adapter_for: Callable[[str | None], MoEAdapter]) -> None:
    """Make ``adapter_for(model_type)`` the adapter of model types no registered family claims."""
    _FALLBACK[:] = [adapter_for]


def get_adapter(model_or_type: nn.Module | str) -> MoEAdapter:
    """The adapter for a model (or a ``model_type``): its family's, else the structural fallback
    (which finds the experts by structure once the model is built); an error if there is neither."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    adapter = _REGISTRY.get(model_type) or (_FALLBACK[0](model_type) if _FALLBACK else None)
    if adapter is None:
        raise AdapterError(
            f"model type {model_type!r} has no moeq adapter; supported MoE families: {', '.join(supported_model_types())}"
        )
    return adapter


def moe_layers_or_error(model: nn.Module) -> tuple[MoEAdapter, list[MoELayer]]:
    """The adapter and MoE layers of ``model``; errors name the problem when it is not an MoE model."""
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    if not layers and adapter not in _REGISTRY.values():
        raise AdapterError(
            f"model type {model.config.model_type!r} has no moeq adapter and no routed experts moeq can find by structure "
            "(an experts module with transformers 5's gate_up_proj/down_proj beside a router); is it an MoE model? "
            f"(by name moeq also reads: {', '.join(supported_model_types())})"
        )
    if not layers:
        raise AdapterError(
            f"found no routed-expert layers in this {model.config.model_type} model; "
            "is it an MoE configuration (num_experts > 0)?"
        )
    return adapter, layers

