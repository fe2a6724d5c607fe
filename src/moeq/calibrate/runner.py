"""Layer-by-layer calibrated quantization (GPTQ) with one decoder layer in memory at a time.

The road, for a decoder-only checkpoint folder:

1. Build the model skeleton on the meta device; give real tensors only to the embeddings (and a
   fresh rotary embedding), run the calibration tokens up to the first decoder layer and keep
   what it would receive (hidden states and the model's own mask and position arguments).
2. For each decoder layer in turn: read its weights from the checkpoint, run the calibration
   inputs through it with hooks that collect, per routed expert, the inputs the router really
   sends it (``Σ x xᵀ`` for the gate/up input and, computed with the original weights, for the
   down input), token counts and routing weights, and the Hessians of the other planned linears.
3. Quantize every planned weight of the layer (GPTQ where an expert saw at least ``min_tokens``
   tokens, the documented fallback where it did not), swap the packed modules in, and run the
   inputs through the *quantized* layer: its outputs are the next layer's inputs, as in GPTQ.
4. Write the layer's tensors as one safetensors shard and send the layer back to the meta device.

The other tensors (embeddings, final norm, head) are copied from the source. The output folder
is assembled in a temporary sibling and renamed into place when complete.

Within a layer, all Hessians are collected in one pass with the original weights, then every
weight is quantized (not GPTQ's "true-sequential" order inside a block): one forward per layer
instead of one per linear, at a small cost in accuracy.

Rare experts: with ``rare_fallback="rtn"`` (default) an expert below ``min_tokens`` is rounded
with the clipping search; with ``"all-tokens"`` a second pass feeds every calibration token to it,
for its Hessians only (the layer's output is unchanged), and GPTQ runs on those.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_directory
from ..io.checkpoint import TOKENIZER_FILES
from ..io.hf import MoeqConfig
from ..io.lazy import LazyModel, open_lazy
from ..modules.convert import validate_plan
from ..modules.linear import QuantizedLinear
from ..plan import BitPlan, TensorSpec
from ..quant.gptq import gptq_quantize
from ..quant.rtn import quantize_rtn
from ..quant.tensor import QuantizedTensor
from .collector import ExpertStatistics
from .hessian import HessianSum
from .routing import RoutingStats

__all__ = ["CalibrationConfig", "CalibrationReport", "collect_routing_streaming", "quantize_calibrated", "RARE_FALLBACKS"]

RARE_FALLBACKS = ("rtn", "all-tokens")


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibrated quantizer runs."""

    quantizer: str = "gptq"  # "gptq", or "rtn" to only collect statistics and round
    min_tokens: int = 16  # per expert; below it the rare-expert fallback applies
    rare_fallback: str = "rtn"  # "rtn" (round with the clipping search) or "all-tokens"
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.quantizer not in ("gptq", "rtn"):
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose gptq or rtn")
        if self.rare_fallback not in RARE_FALLBACKS:
            raise ValueError(f"unknown rare-expert fallback {self.rare_fallback!r}; choose one of: {', '.join(RARE_FALLBACKS)}")
        if self.min_tokens < 0 or not 0 <= self.damp < 1:
            raise ValueError("min_tokens must be >= 0 and damp in [0, 1)")


@dataclass
class CalibrationReport:
    """What the run did: tokens and method per (MoE layer, expert), and the starved experts."""

    tokens: list[list[int]] = field(default_factory=list)
    methods: list[list[str]] = field(default_factory=list)
    routing_weight_sums: list[list[float]] = field(default_factory=list)
    starved: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, expert, tokens)
    calibration_tokens: int = 0


class _Stop(Exception):
    """Raised by the input catcher once the first decoder layer's inputs are captured."""


class _Catcher(nn.Module):
    def __init__(self, store: list) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        raise _Stop


def _decoder_prefix(lazy: LazyModel) -> str:
    base = getattr(lazy.skeleton, "base_model_prefix", "model")
    body = getattr(lazy.skeleton, base, None)
    if lazy.config.is_encoder_decoder or body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
        raise ValueError(
            f"calibrated (GPTQ) quantization runs layer by layer on decoder-only models; "
            f"{lazy.config.model_type} is not supported yet: use --quantizer rtn"
        )
    return base


def _capture_inputs(lazy: LazyModel, prefix: str, token_ids: torch.Tensor, batch_size: int) -> list[tuple]:
    body = lazy.skeleton.get_submodule(prefix)
    lazy.materialize(f"{prefix}.embed_tokens")
    if hasattr(body, "rotary_emb"):
        body.rotary_emb = type(body.rotary_emb)(config=lazy.config)
    first = body.layers[0]
    store: list = []
    body.layers[0] = _Catcher(store)
    try:
        with torch.no_grad():
            for batch in token_ids.split(batch_size):
                try:
                    body(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        body.layers[0] = first
        lazy.release(f"{prefix}.embed_tokens")
    return store


def _layer_output(module: nn.Module, captured: tuple) -> torch.Tensor:
    hidden, args, kwargs = captured
    out = module(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_routing_streaming(
    source: str | Path | LazyModel, token_ids: torch.Tensor, input_moments: bool = False, batch_size: int = 8
) -> RoutingStats:
    """Routing statistics of a decoder-only checkpoint, one layer in memory at a time.

    The same collector as the whole-model pass, fed layer by layer through the original weights.
    ``source`` is a checkpoint folder or an already opened :class:`LazyModel`.
    """
    lazy = source if isinstance(source, LazyModel) else open_lazy(source)
    prefix = _decoder_prefix(lazy)
    statistics = ExpertStatistics("diagonal" if input_moments else None)
    stages = ("in", "out") if input_moments else ("in",)
    inputs = _capture_inputs(lazy, prefix, token_ids, batch_size)
    for number in range(len(lazy.skeleton.get_submodule(f"{prefix}.layers"))):
        path = f"{prefix}.layers.{number}"
        module = lazy.materialize(path)
        hooks = []
        for bound in lazy.adapter.moe_layers(module):
            bound.index = next(layer.index for layer in lazy.layers if layer.path == f"{path}.{bound.path}")
            hooks.append((module.get_submodule(bound.path + ".experts"), statistics.hook(lazy.adapter, bound, stages)))
        handles = [target.register_forward_pre_hook(hook) for target, hook in hooks]
        try:
            inputs = [(_layer_output(module, captured), captured[1], captured[2]) for captured in inputs]
        finally:
            for handle in handles:
                handle.remove()
        lazy.release(path)
    return RoutingStats.from_statistics(statistics, lazy.layers)


def quantize_calibrated(
    folder: str | Path,
    plan: BitPlan,
    token_ids: torch.Tensor,
    out: str | Path,
    config: CalibrationConfig = CalibrationConfig(),
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CalibrationReport:
    """Quantize the checkpoint at ``folder`` by ``plan`` with calibration, writing ``out``."""
    lazy = open_lazy(folder)
    adapter, _ = validate_plan(lazy.skeleton, plan)
    prefix = _decoder_prefix(lazy)
    scale_dtype = getattr(torch, plan.scale_dtype)
    report = CalibrationReport(calibration_tokens=int(token_ids.numel()))
    report.tokens = [[0] * layer.num_experts for layer in lazy.layers]
    report.methods = [[""] * layer.num_experts for layer in lazy.layers]
    report.routing_weight_sums = [[0.0] * layer.num_experts for layer in lazy.layers]
    decoder_layers = lazy.skeleton.get_submodule(f"{prefix}.layers")
    folder = Path(folder)

    with atomic_directory(Path(out), overwrite=overwrite) as work:
        inputs = _capture_inputs(lazy, prefix, token_ids, config.batch_size)
        weight_map: dict[str, str] = {}
        for number in range(len(decoder_layers)):
            path = f"{prefix}.layers.{number}"
            module = lazy.materialize(path)
            moe_layers = [layer for layer in lazy.layers if layer.path.startswith(path + ".")]
            _quantize_layer(lazy, adapter, plan, path, module, moe_layers, inputs, config, scale_dtype, report)
            with torch.no_grad():
                inputs = [(_layer_output(module, captured), captured[1], captured[2]) for captured in inputs]
            shard = f"layer-{number:05d}.safetensors"
            tensors = {f"{path}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
            save_file(tensors, work / shard, metadata={"format": "pt"})
            weight_map.update({key: shard for key in tensors})
            lazy.release(path)
            if progress:
                progress(path)
        rest = _rest_tensors(lazy, prefix)
        save_file(rest, work / "rest.safetensors", metadata={"format": "pt"})
        weight_map.update({key: "rest.safetensors" for key in rest})
        (work / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
        )
        _record(plan, report, config)
        _write_config(lazy, plan, work)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, work / name)
    if report.starved:
        names = ", ".join(f"layer {layer} expert {expert} ({tokens} tokens)" for layer, expert, tokens in report.starved)
        warnings.warn(f"experts below {config.min_tokens} calibration tokens used the '{config.rare_fallback}' fallback: {names}", stacklevel=2)
    return report


def _run(module: nn.Module, inputs: list[tuple], hooks: list[tuple[nn.Module, object]]) -> None:
    """One pass of the calibration inputs through a layer with temporary pre-hooks."""
    handles = [target.register_forward_pre_hook(hook) for target, hook in hooks]
    try:
        with torch.no_grad():
            for captured in inputs:
                _layer_output(module, captured)
    finally:
        for handle in handles:
            handle.remove()


def _quantize_layer(lazy, adapter, plan, path, module, moe_layers, inputs, config, scale_dtype, report) -> None:
    """Collect statistics for one materialized decoder layer, then quantize its planned weights.

    Pass 1 collects the gate/up (and other linears') Hessians with the original weights; the
    gate/up projections are quantized; pass 2 collects each expert's down-projection Hessian from
    the quantized gate/up outputs, so the down projection compensates the error upstream of it.
    """
    stats = ExpertStatistics("full")
    local_layers = {layer.path: layer for layer in adapter.moe_layers(module)}
    live = {}  # MoE layer index -> (MoELayer bound to the materialized weights, experts module)
    for layer in moe_layers:
        bound = local_layers[layer.path[len(path) + 1 :]]
        bound.index = layer.index
        live[layer.index] = (bound, module.get_submodule(bound.path + ".experts"))
    linears = {name: spec for name, spec in plan.linears.items() if name.startswith(path + ".")}
    hooks = [(experts, stats.hook(adapter, bound, ("in",))) for bound, experts in live.values()]
    for name in linears:
        hooks.append((module.get_submodule(name[len(path) + 1 :]), lambda m, a, key=name: stats.add_moment(key, a[0])))
    _run(module, inputs, hooks)

    replacements = {}
    for index, (bound, experts) in live.items():
        specs = plan.expert_specs(index)
        for expert in range(bound.num_experts):
            report.tokens[index][expert] = stats.counts.get((index, expert), 0)
            report.routing_weight_sums[index][expert] = stats.weight_sums.get((index, expert), 0.0)
        starved = {e for e in range(bound.num_experts) if report.tokens[index][e] < config.min_tokens}
        report.starved += [(index, e, report.tokens[index][e]) for e in sorted(starved)]
        if specs:
            replacements[bound.path + ".experts"] = _quantize_experts(
                adapter, module, path, bound, experts, specs, starved, inputs, stats, config, scale_dtype, report
            )
    for name, spec in linears.items():
        relative = name[len(path) + 1 :]
        linear = module.get_submodule(relative)
        replacement = QuantizedLinear(linear.in_features, linear.out_features, spec, scale_dtype,
                                      bias=linear.bias is not None, dtype=linear.weight.dtype)
        method = "gptq" if config.quantizer == "gptq" else "rtn"
        replacement.load_quantized(_quantize(linear.weight, spec, stats.hessians.get(name), method, config, scale_dtype, name))
        if linear.bias is not None:
            replacement.bias = nn.Parameter(linear.bias.detach().clone())
        replacements[relative] = replacement
    for relative, replacement in replacements.items():
        _set(module, relative, replacement)


def _quantize_experts(adapter, module, path, bound, experts, specs, starved, inputs, stats, config, scale_dtype, report):
    """The packed experts of one MoE layer: gate/up first, then down on the quantized gate/up outputs."""
    index = bound.index
    gptq = config.quantizer == "gptq"
    all_tokens = set(starved) if gptq and config.rare_fallback == "all-tokens" else set()
    if all_tokens:  # every token through the starved experts, for their statistics only
        for expert in all_tokens:
            stats.forget((index, expert, "in"))
        _run(module, inputs, [(experts, stats.hook(adapter, bound, ("in",), only=all_tokens))])
    quantized = adapter.quantized_experts(bound, specs, scale_dtype)
    *first, down = bound.projections
    for expert in range(bound.num_experts):
        report.methods[index][expert] = _expert_method(config, expert in starved)

    def put(expert: int, projection: str, stage: str) -> None:
        quantized.expert(expert)[projection].load_quantized(_quantize(
            bound.expert_weight(expert, projection), specs[(expert, projection)], stats.hessians.get((index, expert, stage)),
            report.methods[index][expert], config, scale_dtype, f"{path}.{bound.path}.experts.{expert}.{projection}",
        ))

    for expert in range(bound.num_experts):
        for projection in first:
            put(expert, projection, "in")
    if gptq:
        def upstream(expert: int) -> list[torch.Tensor]:
            return [quantized.expert(expert)[p].weight_for(torch.float32) for p in first]

        _run(module, inputs, [(experts, stats.hook(adapter, bound, ("out",), weights_of=upstream))])
        if all_tokens:  # the all-token pass replaces the starved experts' few routed rows
            for expert in all_tokens:
                stats.forget((index, expert, "out"))
            _run(module, inputs, [(experts, stats.hook(adapter, bound, ("out",), only=all_tokens, weights_of=upstream))])
    for expert in range(bound.num_experts):
        put(expert, down, "out")
    return quantized


def _expert_method(config: CalibrationConfig, starved: bool) -> str:
    if config.quantizer == "rtn":
        return "rtn"
    if not starved:
        return "gptq"
    return "gptq-all-tokens" if config.rare_fallback == "all-tokens" else "rtn-clip"


def _quantize(weight, spec: TensorSpec, hessian: HessianSum | None, method: str, config, scale_dtype, name: str) -> QuantizedTensor:
    if method in ("gptq", "gptq-all-tokens") and hessian is not None and hessian.rows > 0:
        return gptq_quantize(
            weight, hessian.matrix, spec.bits, spec.scheme, spec.group_size, spec.clip_search,
            damp=config.damp, block_size=config.block_size, act_order=config.act_order, scale_dtype=scale_dtype, name=name,
        )
    clip = spec.clip_search or (method == "rtn-clip" and spec.scheme.value != "sign")
    return quantize_rtn(weight, spec.bits, spec.scheme, spec.group_size, clip, scale_dtype)


def _set(module: nn.Module, relative: str, replacement: nn.Module) -> None:
    parent, _, child = relative.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, replacement)


def _rest_tensors(lazy: LazyModel, prefix: str) -> dict[str, torch.Tensor]:
    """Every stored tensor outside the decoder layers (tied ones once), read from the source."""
    out = {}
    layers_prefix = f"{prefix}.layers."
    seen = set()
    for name, param in list(lazy.skeleton.named_parameters()) + list(lazy.skeleton.named_buffers()):
        if name.startswith(layers_prefix) or id(param) in seen:
            continue
        owner = lazy.skeleton.get_submodule(name.rpartition(".")[0]) if "." in name else lazy.skeleton
        if name.rpartition(".")[2] in owner._non_persistent_buffers_set:
            continue
        seen.add(id(param))
        out[name] = lazy.reader.read_first(lazy.adapter.tensor_sources(name), name).contiguous()
    return out


def _record(plan: BitPlan, report: CalibrationReport, config: CalibrationConfig) -> None:
    plan.method["quantizer"] = {
        "name": config.quantizer, "damp": config.damp, "act_order": config.act_order, "block_size": config.block_size,
        "min_tokens": config.min_tokens, "rare_fallback": config.rare_fallback,
        "calibration_tokens": report.calibration_tokens, "expert_methods": report.methods,
    }
    plan.scores["calibration_tokens"] = report.tokens
    plan.scores["routing_weight_sum"] = report.routing_weight_sums


def _write_config(lazy: LazyModel, plan: BitPlan, work: Path) -> None:
    import copy

    config = copy.deepcopy(lazy.config)
    config.architectures = [type(lazy.skeleton).__name__]
    config.quantization_config = MoeqConfig(plan)
    config.save_pretrained(work)
