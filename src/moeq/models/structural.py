"""Any transformers 5 MoE written against its experts interface, found by structure, not by name.

transformers 5 stores a layer's routed experts as one module (decorated ``@use_experts_implementation``)
holding 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, called with ``(hidden,
top_k_index, top_k_weights)``; about sixty model types share it (GLM-4.5, ERNIE-4.5, MiniMax-M2,
Qwen3-Next, Qwen3.5-MoE, DeepSeek-V2, HunYuan, Phi-MoE, GraniteMoE, Jamba, EXAONE-MoE, AFMoE ...).
For every model type but Switch Transformers (one module per expert, its own adapter) this adapter
finds every such experts module (gated, or ``has_gate = False`` with ``up_proj`` alone), its
router beside it (a child ``gate`` or ``router`` holding a ``[E, H]`` weight, or one whose first
``E`` rows are the routed experts' when shared experts are scored with them) and any shared
experts beside it (a child whose name contains ``shared``), and reads the experts as the named
families do. An experts class with its own ``_apply_gate`` keeps it: the quantized layer calls
that very function (:class:`ModelGate`), never a re-written copy. Biases (``has_bias``) stay in
full precision beside the packed weights; gate and up rows that alternate (``is_concatenated =
False``, gpt-oss) are read as two projections by stride. What it cannot read exactly (biases under
other names, a norm after each expert) is refused in one line naming it; the model's routing and
shared experts run as the model defines them.
Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 had hand-written family files; they are read this way
now, and the golden bytes test (``tests/test_golden.py``) holds them to what those files wrote.
"""

from __future__ import annotations

import functools
import re
from dataclasses import replace
from types import SimpleNamespace

import torch
from torch import nn

from .base import BIAS_NAMES, AdapterError, DerivedTensor, FusedExpertsAdapter, LayerStack, TensorSource, experts_dims, register_fallback

__all__ = ["ModelGate", "StructuralAdapter", "structural_adapter"]

ROUTER_NAMES = ("gate", "router")


class StructuralAdapter(FusedExpertsAdapter):
    """Fused experts found by structure (see the module docstring). The
    checkpoint's own names come from transformers' conversion mapping for ``model_type`` (the
    renames it applies when loading, and the per-expert names it merges), read as data."""

    family = "structural"
    model_types = ()
    shared_markers = ("shared_expert", "shared_experts", "shared_mlp")
    router_markers = ("gate", "router", "shared_expert_gate")

    def __init__(self, model_type: str | None = None) -> None:
        self.model_type = model_type
        self.disk_renames, self.disk_projection_names = _disk_rules(model_type)

    def _with_renames(self, sources: list[TensorSource]) -> list[TensorSource]:
        # transformers applies its renames one after another, so a name on disk may differ by several
        out = list(sources)
        for memory, disk in self.disk_renames:
            out += [replace(s, key=s.key.replace(memory, disk)) for s in out if memory in s.key]
        unique: dict[tuple[str, str], TensorSource] = {}
        for source in out:
            unique.setdefault((source.key, repr(source.index)), source)
        return list(unique.values())

    def router_module(self, block: nn.Module) -> str | None:
        # ZAYA's router: a small network (projection, MLP) scoring the experts, kept whole in full precision
        for name in ROUTER_NAMES:
            router = getattr(block, name, None)
            if isinstance(router, nn.Module) and not isinstance(router, nn.Linear) and any(True for _ in router.parameters()):
                return name
        return None

    def loaded_names(self, keys: list[str]) -> dict[str, str | DerivedTensor]:
        """transformers' own load-time renames of ``model_type`` applied to every checkpoint key (regular
        expressions, chained, as its loader applies them), and the tensors its converters build by
        concatenating or interleaving whole checkpoint tensors (Kimi-Linear's q/k/v convolutions).
        Converters that merge per-expert tensors are left out: moeq reads those one expert at a time."""
        renamings, converters = _conversion(self.model_type)
        if not renamings and not converters:
            return {}
        from transformers.core_model_loading import rename_source_key

        names: dict[str, str | DerivedTensor] = {}
        parts: dict[tuple[str, int], dict[str, str]] = {}
        for key in keys:
            renamed, _ = rename_source_key(key, renamings, [])
            if renamed != key:
                names[renamed] = key
            for number, converter in enumerate(converters):
                target, pattern = converter.rename_source_key(renamed)
                if pattern is not None:
                    parts.setdefault((target, number), {})[pattern] = key
                    break
        for (target, number), found in parts.items():
            converter = converters[number]
            if set(found) == set(converter.source_patterns):
                names[target] = DerivedTensor(tuple(found[p] for p in converter.source_patterns), functools.partial(_convert, converter))
        return names

    def router_weight(self, block: nn.Module, experts: nn.Module) -> torch.Tensor | None:
        count = _experts_count(experts)
        hidden = _hidden_size(experts)
        for name in ROUTER_NAMES:
            router = getattr(block, name, None)
            if not isinstance(router, nn.Module):
                continue
            candidates = [getattr(router, "weight", None), *router.parameters()]
            for parameter in candidates:
                if isinstance(parameter, torch.Tensor) and tuple(parameter.shape) == (count, hidden):
                    return parameter
            # shared experts scored by the router's own weight, after the routed ones (Inkling: [E + shared, H])
            weight = candidates[0]
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == hidden and count < weight.shape[0] <= 2 * count:
                return weight[:count]
        return None

    def experts_activation(self, experts: nn.Module):
        return ModelGate(experts) if getattr(experts, "has_gate", True) and _own_gate(experts) else experts.act_fn

    def check_experts(self, path: str, experts: nn.Module) -> None:
        problems = []
        unknown = sorted(n for n, _ in experts.named_parameters() if n.endswith("bias") and n not in BIAS_NAMES)
        if unknown:
            problems.append(f"with biases named {', '.join(unknown)}")
        if getattr(experts, "has_bias", False) and not any(isinstance(getattr(experts, n, None), torch.Tensor) for n in BIAS_NAMES):
            problems.append("with biases it does not hold as " + "/".join(BIAS_NAMES))
        if getattr(experts, "has_post_expert_norm", False):
            problems.append("with a norm after each expert")
        if not hasattr(experts, "act_fn") and not _own_gate(experts):
            problems.append("without an act_fn")
        if problems:
            raise AdapterError(
                f"{path} ({type(experts).__name__}) keeps its experts {', '.join(problems)}; moeq reads experts stored as "
                "gate_up_proj/down_proj (or up_proj/down_proj, either transposed or not, with or without "
                + "/".join(BIAS_NAMES) + "), so it cannot quantize this model yet"
            )

    def router_sources(self, layer) -> list[TensorSource]:
        sources = []
        if layer.router_name:  # the very parameter found in memory, by its name (its routed rows)
            sources.append(TensorSource(f"{layer.path}.{layer.router_name}", (slice(0, layer.num_experts),)))
        names = [f"{layer.path}.{name}.weight" for name in ROUTER_NAMES]
        names += [f"{layer.path}.gate.wg.weight"]  # HunYuan's router keeps its weight one module down
        return self._with_renames(sources + [TensorSource(name) for name in names])

    def next_block_inputs(self, captured: tuple, output, block: nn.Module | None = None) -> tuple:
        # A block that carries a state to the next one (ZAYA's router states): it returns (hidden,
        # state) and takes the state as its first positional argument after the hidden states,
        # named prev_*, as the model's own loop passes it.
        hidden, args, kwargs = captured
        if block is not None and isinstance(output, tuple) and len(output) == 2 and args and _carries_state(block):
            return output[0], (output[1], *args[1:]), kwargs
        return super().next_block_inputs(captured, output, block)

    def layer_stacks(self, model: nn.Module) -> list[LayerStack]:
        try:
            return super().layer_stacks(model)
        except ValueError:
            pass
        # the module list holding the MoE blocks, and the input embedding, found by structure
        # (a multimodal model's language_model, a hybrid's backbone with its own embedding name)
        parts = self.moe_layers(model)[0].path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            if isinstance(model.get_submodule(".".join(parts[:cut])), nn.ModuleList):
                embedding = model.get_input_embeddings()
                name = next(n for n, m in model.named_modules() if m is embedding)
                return [LayerStack(".".join(parts[: cut - 1]), parts[cut - 1], (name,))]
        raise ValueError(f"{model.config.model_type}: no decoder body with embeddings and layers to calibrate through")


def _carries_state(block: nn.Module) -> bool:
    import inspect

    parameters = list(inspect.signature(type(block).forward).parameters)
    return len(parameters) > 2 and parameters[2].startswith("prev_")  # (self, hidden_states, prev_..., ...)


def _own_gate(experts: nn.Module) -> bool:
    """Whether the experts class defines its own ``_apply_gate`` (not transformers' default)."""
    gate = getattr(type(experts), "_apply_gate", None)
    return gate is not None and gate.__name__ != "_default_apply_gate"


class ModelGate(nn.Module):
    """A model's own gate function (its experts class's ``_apply_gate``), called on the fused
    gate and up outputs exactly as the model calls it (concatenated, or alternating where the
    model stores them so: ``is_concatenated = False``). The quantized layer uses it in place of
    ``act(gate) * up``; it holds the experts module's settings and child modules (its
    ``act_fn``), not its weights."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.owner = type(experts)
        self.settings = {k: v for k, v in vars(experts).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)}
        for name, child in experts.named_children():
            self.add_module(name, child)
        self.__name__ = f"{self.owner.__name__}._apply_gate"

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        holder = SimpleNamespace(**self.settings, **dict(self.named_children()))
        if self.settings.get("is_concatenated", True) is False:
            return self.owner._apply_gate(holder, torch.stack([gate, up], dim=-1).flatten(-2))
        return self.owner._apply_gate(holder, torch.cat([gate, up], dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.__name__} gates two projections; call combine(gate, up)")


def _experts_count(experts: nn.Module) -> int:
    if hasattr(experts, "num_experts"):
        return int(experts.num_experts)
    return int(experts.down_proj.shape[0])


def _hidden_size(experts: nn.Module) -> int:
    if hasattr(experts, "down_proj") and isinstance(experts.down_proj, torch.Tensor):
        return experts_dims(experts)[0]
    first = experts.expert(0)
    return int(first[experts.projections[0]].in_features)


def _plain(pattern: str) -> str | None:
    """A conversion pattern as the plain substring it matches (``None``: a real regular expression)."""
    text = pattern.replace("\\.", ".")
    return None if re.search(r"[\\^$*+?()\[\]{}|]", text) else text


def _disk_rules(model_type: str | None) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """``(renames memory -> disk, projection -> per-expert name on disk)`` from transformers'
    checkpoint conversion mapping of ``model_type`` (none when it has no mapping)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) or [] if model_type else []
    except Exception:  # noqa: BLE001 - an older transformers, or a type it does not know: plain names
        mapping = []
    renames, names = [], {}
    for rule in mapping:
        sources, targets = list(getattr(rule, "source_patterns", [])), list(getattr(rule, "target_patterns", []))
        if type(rule).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            disk, memory = _plain(sources[0]), _plain(targets[0])
            if disk is not None and memory is not None:
                renames.append((memory, disk))
        elif type(rule).__name__ == "WeightConverter" and len(targets) == 1:
            merged = [re.fullmatch(r".*experts\.\*\.(\w+)\.weight", source) for source in sources]
            projections = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(targets[0].rsplit(".", 1)[-1], ())
            if all(merged) and len(merged) == len(projections):
                names.update({projection: match.group(1) for projection, match in zip(projections, merged)})
    return tuple(renames), names


def _conversion(model_type: str | None) -> tuple[list, list]:
    """transformers' load-time renamings of ``model_type``, and its converters that build one tensor
    from whole tensors by a single concatenation or interleave (the ones moeq applies on read)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, Interleave, WeightConverter, WeightRenaming

        mapping = (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    except Exception:  # noqa: BLE001 - an older transformers: plain names only
        return [], []
    renamings = [rule for rule in mapping if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in mapping if isinstance(rule, WeightConverter) and len(rule.target_patterns) == 1
                  and len(rule.operations) == 1 and type(rule.operations[0]) in (Concatenate, Interleave)
                  and not any("*" in pattern for pattern in rule.source_patterns)]
    return renamings, converters


def _convert(converter, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``converter``'s own operation on its source tensors (in its source patterns' order)."""
    inputs = dict(zip(converter.source_patterns, tensors, strict=True))
    (out,) = converter.operations[0].convert(inputs, converter.source_patterns, converter.target_patterns).values()
    return out


@functools.cache
def structural_adapter(model_type: str | None) -> StructuralAdapter:
    """The structural adapter for ``model_type`` (one per type: its checkpoint names differ)."""
    return StructuralAdapter(model_type)


register_fallback(structural_adapter)
