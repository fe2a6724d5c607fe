"""Layer-by-layer calibrated quantization (GPTQ) with one block in memory at a time.

The road, for a checkpoint folder (the adapter says which stacks of blocks to walk: the decoder,
or the encoder and then the decoder of an encoder-decoder model):

1. Build the model skeleton on the meta device; give real tensors only to the embeddings (and a
   fresh rotary embedding), run the calibration tokens up to the stack's first block and keep
   what it would receive (hidden states and the model's own mask and position arguments).
2. For each block in turn: read its weights from the checkpoint, run the calibration
   inputs through it with hooks that collect, per routed expert, the inputs the router really
   sends it (``Σ x xᵀ`` for the gate/up input and, computed with the original weights, for the
   down input), token counts and routing weights, and the Hessians of the other planned linears.
3. Quantize every planned weight of the layer (GPTQ where an expert saw at least ``min_tokens``
   tokens, the documented fallback where it did not), swap the packed modules in, and run the
   inputs through the *quantized* layer: its outputs are the next layer's inputs, as in GPTQ.
4. Write the layer's tensors as one safetensors shard and send the layer back to the meta device.

The other tensors (embeddings, final norm, head) are copied from the source (a planned head is
rounded: GPTQ here covers the blocks). The output is assembled in a resumable work folder
(:mod:`moeq.io.resumable`) and renamed into place when complete; a killed run resumes after its
last finished block.

Within a layer, all Hessians are collected in one pass with the original weights, then every
weight is quantized (not GPTQ's "true-sequential" order inside a block): one forward per layer
instead of one per linear, at a small cost in accuracy.

Rare experts: with ``rare_fallback="rtn"`` (default) an expert below ``min_tokens`` is rounded
with the clipping search; with ``"all-tokens"`` a second pass feeds every calibration token to it,
for its Hessians only (the layer's output is unchanged), and GPTQ runs on those.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..io.lazy import LazyModel, open_lazy
from ..io.resumable import ResumableOutput, fingerprint_inputs
from ..io.source import require_full_precision
from ..executors import Executor, SerialExecutor
from ..io.streaming import REST_UNIT, block_paths, metadata_writer, rest_tensors
from ..models import MoELayer
from ..modules.convert import copy_biases, packed_linear, prepare_block, validate_plan
from ..modules.experts import quantized_experts_for
from ..modules.recipe import GPTQOptions, LayerJob, WeightJob, expert_method, quantize_layer
from ..plan import BitPlan
from .collector import ExpertStatistics
from .routing import RoutingStats

__all__ = ["RARE_FALLBACKS", "CalibrationConfig", "CalibrationReport", "collect_routing_streaming", "quantize_calibrated", "visit_moe_layers"]

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

    @property
    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(damp=self.damp, act_order=self.act_order, block_size=self.block_size)


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


def _capture(lazy: LazyModel, stack, token_ids: torch.Tensor, batch_size: int, contexts) -> list[tuple]:
    """The first block's inputs ``(hidden, args, kwargs)`` for every calibration batch."""
    for path in stack.inputs:
        lazy.materialize(path)
    lazy.materialize_own(stack.path)
    blocks = lazy.skeleton.get_submodule(f"{stack.path}.{stack.blocks}")
    first = blocks[0]
    store: list = []
    blocks[0] = _Catcher(store)
    try:
        with torch.no_grad():
            for number, batch in enumerate(token_ids.split(batch_size)):
                try:
                    lazy.adapter.run_stack(lazy.skeleton, stack, batch, None if contexts is None else contexts[number])
                except _Stop:
                    pass
    finally:
        blocks[0] = first
        for path in stack.inputs:
            lazy.release(path)
        lazy.release_own(stack.path)
    return store


def _call(module: nn.Module, captured: tuple):
    hidden, args, kwargs = captured
    return module(hidden, *args, **kwargs)


def _walk(
    lazy: LazyModel,
    token_ids: torch.Tensor,
    batch_size: int,
    on_block: Callable[[str, nn.Module, list[tuple]], None],
    after_block: Callable[[str, nn.Module], None] | None = None,
    restore: Callable[[str, nn.Module], bool] | None = None,
) -> None:
    """Feed the calibration tokens through every stack with one block materialized at a time.

    ``on_block(path, module, inputs)`` sees each block with its real weights before its outputs
    are computed (it may collect statistics and swap in quantized modules); the outputs of the
    block as it then stands are the next block's inputs; ``after_block(path, module)`` runs before
    the block goes back to the meta device. A block for which ``restore(path, module)`` returns
    True was finished by an earlier run and restored from its output: it only computes its outputs.
    """
    adapter = lazy.adapter
    contexts = None
    with torch.no_grad():
        for stack in adapter.layer_stacks(lazy.skeleton):
            inputs = _capture(lazy, stack, token_ids, batch_size, contexts)
            for number in range(len(lazy.skeleton.get_submodule(f"{stack.path}.{stack.blocks}"))):
                path = f"{stack.path}.{stack.blocks}.{number}"
                module = lazy.materialize(path)
                restored = restore is not None and restore(path, module)
                if not restored:
                    on_block(path, module, inputs)
                inputs = [adapter.next_block_inputs(captured, _call(module, captured), module) for captured in inputs]
                if after_block and not restored:
                    after_block(path, module)
                lazy.release(path)
            for path in stack.outputs:
                lazy.materialize(path)
            contexts = adapter.stack_context(lazy.skeleton, stack, [captured[0] for captured in inputs])
            for path in stack.outputs:
                lazy.release(path)


def _bind(lazy: LazyModel, path: str, module: nn.Module) -> list:
    """The MoE layers inside a materialized block, bound to its weights, with their global index."""
    bound_layers = []
    for bound in lazy.adapter.moe_layers(module):
        bound.index = next(layer.index for layer in lazy.layers if layer.path == f"{path}.{bound.path}")
        bound_layers.append(bound)
    return bound_layers


def visit_moe_layers(
    lazy: LazyModel, token_ids: torch.Tensor, visit: Callable[[MoELayer, Callable], None], batch_size: int = 8
) -> None:
    """Call ``visit(layer, run)`` for every MoE layer, one block in memory at a time, original weights.

    ``layer`` is bound to the materialized weights (global index); ``run(hook)`` passes the
    calibration inputs through the block once with ``hook`` as a forward pre-hook of the layer's
    experts module (the ``(hidden, top_k_index, top_k_weights)`` call).
    """

    def on_block(path: str, module: nn.Module, inputs: list[tuple]) -> None:
        for bound in _bind(lazy, path, module):
            experts = module.get_submodule(bound.path + ".experts")
            visit(bound, lambda hook, experts=experts: _run(module, inputs, [(experts, hook)]))

    _walk(lazy, token_ids, batch_size, on_block)


def collect_routing_streaming(
    source: str | Path | LazyModel, token_ids: torch.Tensor, input_moments: bool = False, batch_size: int = 8
) -> RoutingStats:
    """Routing statistics of a checkpoint, one block in memory at a time.

    The same collector as the whole-model pass, fed block by block through the original weights.
    ``source`` is a checkpoint folder or an already opened :class:`LazyModel`.
    """
    lazy = source if isinstance(source, LazyModel) else open_lazy(source)
    statistics = ExpertStatistics("diagonal" if input_moments else None)
    stages = ("in", "out") if input_moments else ("in",)

    def on_block(path: str, module: nn.Module, inputs: list[tuple]) -> None:
        hooks = [(module.get_submodule(b.path + ".experts"), statistics.hook(lazy.adapter, b, stages)) for b in _bind(lazy, path, module)]
        _run(module, inputs, hooks)

    _walk(lazy, token_ids, batch_size, on_block)
    return RoutingStats.from_statistics(statistics, lazy.layers)


def quantize_calibrated(
    folder: str | Path,
    plan: BitPlan,
    token_ids: torch.Tensor,
    out: str | Path,
    config: CalibrationConfig = CalibrationConfig(),
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    resume: bool = False,
    executor: Executor | None = None,
) -> CalibrationReport:
    """Quantize the checkpoint at ``folder`` by ``plan`` with calibration, writing ``out``.

    Each finished block is written as one shard of a resumable work folder; with ``resume`` a
    killed run continues from its last finished block (same model, plan, options and tokens).
    The finished blocks are run again, quantized as written, to recompute the next block's inputs.
    The saved plan records the calibration (tokens and method per expert); ``plan`` is not changed.
    ``executor`` (:mod:`moeq.executors`) runs each layer's :func:`~moeq.modules.recipe.quantize_layer`
    jobs, the layer's weights split into one job per worker (default: here, one job); GPTQ's layers
    stay in order, as each layer's inputs are the quantized previous layer's outputs. The bytes do
    not depend on the executor or its workers.
    """
    executor = executor or SerialExecutor()
    plan = BitPlan.from_json(plan.to_json())
    require_full_precision(folder)
    lazy = open_lazy(folder)
    adapter, _ = validate_plan(lazy.skeleton, plan)
    lazy.check_tensors()
    scale_dtype = getattr(torch, plan.scale_dtype)
    report = CalibrationReport(calibration_tokens=int(token_ids.numel()))
    report.tokens = [[0] * layer.num_experts for layer in lazy.layers]
    report.methods = [[""] * layer.num_experts for layer in lazy.layers]
    report.routing_weight_sums = [[0.0] * layer.num_experts for layer in lazy.layers]
    fingerprint = fingerprint_inputs(folder, kind="calibrated", plan=plan.to_json(), config=asdict(config), tokens=token_ids)
    with ResumableOutput(out, fingerprint, overwrite=overwrite, resume=resume, inputs=(folder,)) as output:

        def on_block(path: str, module: nn.Module, inputs: list[tuple]) -> None:
            rows = _quantize_layer(lazy, adapter, plan, path, module, _bind(lazy, path, module), inputs, config, scale_dtype, executor)
            _restore_report_rows(report, {"layers": rows, "starved": [entry for row in rows.values() for entry in row["starved"]]})

        def after_block(path: str, module: nn.Module) -> None:
            indices = [layer.index for layer in lazy.layers if layer.path.startswith(path + ".")]
            output.write(path, {f"{path}.{k}": v.detach() for k, v in module.state_dict().items()}, _report_rows(report, indices))
            if progress:
                progress(path)

        def restore(path: str, module: nn.Module) -> bool:
            record = output.finished(path)
            if record is None:
                return False
            prepare_block(module, path, adapter, _bind(lazy, path, module), plan)
            shard = load_file(output.shard_path(path))
            module.load_state_dict({key[len(path) + 1 :]: tensor for key, tensor in shard.items()}, strict=True)
            _restore_report_rows(report, record["extra"])
            if progress:
                progress(path)
            return True

        blocks = block_paths(lazy)
        if all(output.finished(path) for path in blocks):  # only the rest was missing: no pass needed
            for path in blocks:
                _restore_report_rows(report, output.finished(path)["extra"])
        else:
            _walk(lazy, token_ids, config.batch_size, on_block, after_block, restore)
        if not output.finished(REST_UNIT):
            output.write(REST_UNIT, rest_tensors(lazy, plan))
        _record(plan, report, config)
        output.complete(metadata_writer(lazy, plan))
    if report.starved:
        names = ", ".join(f"layer {layer} expert {expert} ({tokens} tokens)" for layer, expert, tokens in report.starved)
        warnings.warn(f"experts below {config.min_tokens} calibration tokens used the '{config.rare_fallback}' fallback: {names}", stacklevel=2)
    return report


def _report_rows(report: CalibrationReport, indices: list[int]) -> dict:
    """The report entries of the MoE layers ``indices``, as stored with their block's shard."""
    return {
        "layers": {
            str(i): {"tokens": report.tokens[i], "methods": report.methods[i], "routing_weight_sums": report.routing_weight_sums[i]}
            for i in indices
        },
        "starved": [list(entry) for entry in report.starved if entry[0] in indices],
    }


def _restore_report_rows(report: CalibrationReport, rows: dict) -> None:
    """Put report rows (as :func:`_report_rows` gives them, or a layer's fresh ones) into ``report``."""
    for index, row in rows["layers"].items():
        report.tokens[int(index)] = row["tokens"]
        report.methods[int(index)] = row["methods"]
        report.routing_weight_sums[int(index)] = row["routing_weight_sums"]
    report.starved += [tuple(entry) for entry in rows["starved"]]
    report.starved.sort()


def _run(module: nn.Module, inputs: list[tuple], hooks: list[tuple[nn.Module, object]]) -> None:
    """One pass of the calibration inputs through a layer with temporary pre-hooks."""
    handles = [target.register_forward_pre_hook(hook) for target, hook in hooks]
    try:
        with torch.no_grad():
            for captured in inputs:
                _call(module, captured)
    finally:
        for handle in handles:
            handle.remove()


def _quantize_layer(lazy, adapter, plan, path, module, moe_layers, inputs, config, scale_dtype, executor) -> dict:
    """Collect statistics for one materialized decoder layer, quantize its planned weights and swap
    the packed modules in; returns the layer's report rows (tokens, methods, starved experts).

    Pass 1 collects the gate/up (and other linears') Hessians with the original weights; the
    gate/up projections and the linears are quantized; pass 2 collects each expert's down-projection
    Hessian from the quantized gate/up outputs, so the down projection compensates the error
    upstream of it. The quantizing itself is :func:`quantize_layer` jobs run by ``executor``.
    """
    stats = ExpertStatistics("full")
    # MoE layer index -> (MoELayer bound to the materialized weights, its experts module)
    live = {bound.index: (bound, module.get_submodule(bound.path + ".experts")) for bound in moe_layers}
    linears = {name: spec for name, spec in plan.linears.items() if name.startswith(path + ".")}
    hooks = [(experts, stats.hook(adapter, bound, ("in",))) for bound, experts in live.values()]
    for name in linears:
        hooks.append((module.get_submodule(name[len(path) + 1 :]), lambda m, a, key=name: stats.add_moment(key, a[0])))
    _run(module, inputs, hooks)

    rows, packed, first_stage = {}, {}, []
    for index, (bound, experts) in live.items():
        tokens = [stats.counts.get((index, e), 0) for e in range(bound.num_experts)]
        starved = {e for e in range(bound.num_experts) if tokens[e] < max(config.min_tokens, 1)}
        methods = [expert_method(config.quantizer, e in starved, config.rare_fallback) for e in range(bound.num_experts)]
        rows[index] = {
            "tokens": tokens, "methods": methods,
            "routing_weight_sums": [stats.weight_sums.get((index, e), 0.0) for e in range(bound.num_experts)],
            "starved": [(index, e, tokens[e]) for e in sorted(starved)],
        }
        specs = plan.expert_specs(index)
        if not specs:
            continue
        all_tokens = {e for e in starved if methods[e] == "gptq-all-tokens"}
        if all_tokens:  # every token through the starved experts, for their statistics only
            for expert in all_tokens:
                stats.forget((index, expert, "in"))
            _run(module, inputs, [(experts, stats.hook(adapter, bound, ("in",), only=all_tokens))])
        packed[index] = quantized_experts_for(adapter, bound, specs, scale_dtype)
        copy_biases(packed[index], bound)
        first_stage += _expert_jobs(path, bound, specs, methods, stats, bound.projections[:-1], "in")
    for name, spec in linears.items():
        method = "gptq" if config.quantizer == "gptq" else "rtn"
        first_stage.append((name, WeightJob(name, module.get_submodule(name[len(path) + 1 :]).weight, spec, method, _hessian(stats, name))))
    placed = _run_jobs(first_stage, config, scale_dtype, executor)

    replacements = {}
    for name, spec in linears.items():
        relative = name[len(path) + 1 :]
        linear = module.get_submodule(relative)
        replacements[relative] = packed_linear(linear, placed[name], linear.bias, spec, scale_dtype)
    down_stage = []
    for index, quantized in packed.items():
        bound, experts = live[index]
        *first, down = bound.projections
        for expert in range(bound.num_experts):
            for projection in first:
                quantized.expert(expert)[projection].load_quantized(placed[(index, expert, projection)])
        if config.quantizer == "gptq":
            def upstream(expert: int, quantized=quantized, first=first) -> list[torch.Tensor]:
                return [quantized.expert(expert)[p].weight_for(torch.float32) for p in first]

            all_tokens = {e for e, method in enumerate(rows[index]["methods"]) if method == "gptq-all-tokens"}
            _run(module, inputs, [(experts, stats.hook(adapter, bound, ("out",), weights_of=upstream))])
            if all_tokens:  # the all-token pass replaces the starved experts' few routed rows
                for expert in all_tokens:
                    stats.forget((index, expert, "out"))
                _run(module, inputs, [(experts, stats.hook(adapter, bound, ("out",), only=all_tokens, weights_of=upstream))])
        down_stage += _expert_jobs(path, bound, plan.expert_specs(index), rows[index]["methods"], stats, [down], "out")
    for (index, expert, projection), result in _run_jobs(down_stage, config, scale_dtype, executor).items():
        packed[index].expert(expert)[projection].load_quantized(result)
    for index, quantized in packed.items():
        replacements[live[index][0].path + ".experts"] = quantized
    for relative, replacement in replacements.items():
        _set(module, relative, replacement)
    return rows


def _hessian(stats: ExpertStatistics, key) -> torch.Tensor | None:
    hessian = stats.hessians.get(key)
    return hessian.matrix if hessian is not None and hessian.rows > 0 else None


def _expert_jobs(path, bound, specs, methods, stats, projections, stage) -> list[tuple]:
    """``((layer, expert, projection), WeightJob)`` for ``projections`` of every expert of ``bound``."""
    jobs = []
    for projection in projections:
        for expert in range(bound.num_experts):
            name = f"{path}.{bound.path}.experts.{expert}.{projection}"
            weight = bound.expert_weight(expert, projection)
            hessian = _hessian(stats, (bound.index, expert, stage)) if methods[expert].startswith("gptq") else None
            jobs.append(((bound.index, expert, projection), WeightJob(name, weight, specs[(expert, projection)], methods[expert], hessian)))
    return jobs


def _run_jobs(keyed: list[tuple], config: CalibrationConfig, scale_dtype: torch.dtype, executor: Executor) -> dict:
    """The packed weight of every ``(key, WeightJob)``: the weights split into ``executor.workers``
    contiguous :class:`LayerJob` s (each result equals its weight quantized alone, so the split
    never changes a byte), run by ``executor``, placed in order."""
    if not keyed:
        return {}
    size = -(-len(keyed) // max(1, executor.workers))
    dtype = str(scale_dtype).removeprefix("torch.")
    threads = torch.get_num_threads()  # the workers compute as this process would: the same bytes
    jobs = [LayerJob(tuple(item for _, item in keyed[i:i + size]), dtype, config.gptq_options, threads)
            for i in range(0, len(keyed), size)]
    results = [result for part in executor.map(quantize_layer, jobs) for result in part]
    return {key: result for (key, _), result in zip(keyed, results)}


def _set(module: nn.Module, relative: str, replacement: nn.Module) -> None:
    parent, _, child = relative.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, replacement)


def _record(plan: BitPlan, report: CalibrationReport, config: CalibrationConfig) -> None:
    plan.method["quantizer"] = {
        "name": config.quantizer, "damp": config.damp, "act_order": config.act_order, "block_size": config.block_size,
        "min_tokens": config.min_tokens, "rare_fallback": config.rare_fallback,
        "calibration_tokens": report.calibration_tokens, "expert_methods": report.methods,
    }
    plan.scores["calibration_tokens"] = report.tokens
    plan.scores["routing_weight_sum"] = report.routing_weight_sums
