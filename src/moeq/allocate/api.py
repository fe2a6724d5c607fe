"""``moeq.allocate``: from a model (in memory or a folder read lazily) to a BitPlan.

Strategies (PAPERS.md §1 and the baselines it is compared with):

==================  ===============================================================================
``router-maxvar``   the paper: Λ ascending, then one pass of ζ-promotion by MaxVar; count rules
``router``          Λ ascending only; count rules
``variance``        MaxVar ascending (the paper's ablation, as PAPERS.md states it); count rules
``frequency``       most frequently routed first (calibration); count rules
``routing-weight``  largest mean routing weight first (calibration); count rules
``random``          a seeded random order; count rules
``uniform``         every expert at one width
``pmq``             MC-MoE's per-layer integer program over frequency^α · weight^β · error
``error-ilp``       one integer program over all experts: least total error within the budget
``auto``            one integer program over all experts: least total predicted damage (routing-
                    weighted change of each layer's output on calibration text, :mod:`.damage`),
                    any set of widths (default 4,3,2,1), no count rule
==================  ===============================================================================

The data-free strategies (``router-maxvar``, ``router``, ``variance``, ``random``, ``uniform``)
read only what they need from a checkpoint folder: router rows, and the first expert weight for
MaxVar. Budgets: ``avg_bits`` (mean over routed expert weights, the paper's measure) or
``max_bytes`` (true size of the whole quantized model); the plan reports both.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..calibrate.runner import CalibrationConfig
from ..executors import Executor
from ..config import QuantConfig, linear_specs, plan_budget
from ..models import MoELayer, moe_layers_or_error
from ..plan import BitPlan, ExpertEntry, PlanError, TensorSpec
from ..targets import Target, get_target
from .counts import CountError, level_counts, validate_levels
from .damage import DamageTable, damage_table
from .ilp import AllocationInfeasible, error_ilp, pmq_layer
from .ranking import ZETA, ascending_order, descending_order, random_order, router_maxvar_order, widths_from_order
from ..files import INITIAL_ROUTER_FILE, ROUTER_TUNE_FILE
from .scores import max_var, quantization_error, router_norm_change

__all__ = ["AllocationConfig", "AUTO_LEVELS", "CALIBRATED_STRATEGIES", "DEFAULT_LEVELS", "STRATEGIES", "allocate", "open_source", "router_signal", "routing_statistics"]

ORDER_STRATEGIES = ("router-maxvar", "router", "variance", "frequency", "routing-weight", "random")
STRATEGIES = (*ORDER_STRATEGIES, "uniform", "pmq", "error-ilp", "auto")
CALIBRATED_STRATEGIES = ("frequency", "routing-weight", "pmq", "auto")
DEFAULT_LEVELS = (3, 2, 1)
AUTO_LEVELS = (4, 3, 2, 1)
TARGET_LEVELS = (4, 3, 2)  # the count rules' default for a target with fixed types (its 1-bit type only when asked)
TARGET_AUTO_LEVELS = (6, 5, 4, 3, 2)


@dataclass
class _Source:
    layers: list[MoELayer]
    budget_model: nn.Module  # the model or its meta skeleton: shapes and dtypes for byte counts
    folder: Path | None
    model: nn.Module | None
    reader_bytes: Callable[[], int]
    lazy: object | None = None  # the LazyModel of a checkpoint folder

    def bytes_read(self) -> int:
        return self.reader_bytes()


def open_source(model_or_path: nn.Module | str | Path) -> _Source:
    """A model, or a checkpoint folder opened lazily, as the statistics below read it."""
    if isinstance(model_or_path, nn.Module):
        _, layers = moe_layers_or_error(model_or_path)
        return _Source(layers, model_or_path, None, model_or_path, lambda: 0)
    from ..io.lazy import open_lazy

    lazy = open_lazy(model_or_path)
    return _Source(lazy.layers, lazy.skeleton, Path(model_or_path), None, lambda: lazy.reader.bytes_read, lazy)


PROXY_SIGNAL = "final-norm proxy: no reference checkpoint was given"


def _reference_routers(reference: nn.Module | str | Path, layers: list[MoELayer], adapter) -> list[torch.Tensor]:
    """Router weights of the reference: a model, a checkpoint folder, or a safetensors file of routers."""
    if isinstance(reference, nn.Module):
        _, ref_layers = moe_layers_or_error(reference)
        routers = [layer.router_weight for layer in ref_layers]
    elif Path(reference).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(reference))
        routers = []
        for layer in layers:
            key = next((s.key for s in adapter.router_sources(layer) if s.key in tensors), None)
            if key is None:
                raise PlanError(f"{reference} holds no router for {layer.path}")
            routers.append(tensors[key])
    else:
        from ..io.lazy import open_lazy

        routers = [layer.router_weight for layer in open_lazy(reference).layers]
    if len(routers) != len(layers):
        raise ValueError(f"the reference has {len(routers)} MoE layers, the model {len(layers)}; it must be the same architecture")
    for layer, router in zip(layers, routers):
        if tuple(router.shape) != tuple(layer.router_weight.shape):
            raise PlanError(f"the reference's router of {layer.path} has shape {list(router.shape)}, the model's "
                            f"{list(layer.router_weight.shape)}; the reference must be the same architecture")
    return routers


def _one_bit_aware_spec(bits: int, scheme: str, group_size: int | None, clip_search: bool = False) -> TensorSpec:
    # The paper's 1-bit experts are sign codes with a mean-|w| scale (no clipping search applies);
    # other widths use ``scheme``.
    if bits == 1:
        return TensorSpec(1, "sign", group_size)
    return TensorSpec(bits, "asym" if scheme == "sign" else scheme, group_size, clip_search)


@dataclass(frozen=True)
class AllocationConfig:
    """How :func:`allocate` chooses widths: everything but the model, the budget and the data.

    Fields:
        strategy: one of :data:`STRATEGIES`.
        levels: candidate widths (two, or three equally spaced, for the count rules; any set for
            ``pmq``, ``error-ilp`` and ``auto``; ignored by ``uniform``). Default 3,2,1 (4,3,2,1
            for ``auto``; a fixed-type target's own levels).
        scheme / group_size / clip_search: how the chosen widths will be quantized (1-bit experts
            use sign, without the clipping search).
        zeta / maxvar_variant: the promotion threshold and MaxVar definition (``paper`` or
            ``authors``). seed: for ``random``.
        pmq_alpha / pmq_beta: exponents of frequency and routing weight in ``pmq``.
        weighted_error: weight quantization errors by calibration input second moments.
        calib_tokens / seq_len: the calibration slice taken from text.
        other_linears: widths for attention / shared / dense / lm_head linears by role (its
            ``attn_bits`` etc.); the routed experts are what :func:`allocate` allocates.
        damage_quantizer: ``rtn`` or ``gptq``, the quantizer whose damage ``auto`` predicts (the
            one that will run); ``gptq``: its settings (damping, column order, token minimum).
        target: the runtime the plan is for (:mod:`moeq.targets`): ``moeq`` (a width per expert,
            any scheme) or ``gguf`` (llama.cpp's types, one per (layer, projection) expert stack).
            For a target other than ``moeq``, widths are its levels, the scheme is its types', and
            ``avg_bits`` counts the file's true bits per expert weight (Q4_K: 4.5). ``auto`` and
            ``error-ilp`` choose a level per (layer, projection); the other strategies choose per
            expert, then each expert stack takes the largest type within its experts' bytes
            (``method["target"]`` says what that widening cost in mean bits).
    """

    strategy: str = "router-maxvar"
    levels: tuple[int, ...] | None = None
    scheme: str = "asym"
    group_size: int | None = None
    clip_search: bool = False
    zeta: float = ZETA
    maxvar_variant: str = "paper"
    seed: int = 0
    pmq_alpha: float = 1.0
    pmq_beta: float = 1.0
    weighted_error: bool = False
    calib_tokens: int = 16384
    seq_len: int = 256
    other_linears: QuantConfig | None = None
    damage_quantizer: str = "rtn"
    gptq: CalibrationConfig | None = None
    target: str | Target = "moeq"

    def __post_init__(self) -> None:
        if self.levels is not None:
            object.__setattr__(self, "levels", tuple(self.levels))


CONFIG_FIELDS = tuple(f.name for f in fields(AllocationConfig))


def _resolve_config(config: AllocationConfig | None, strategy: str | None, options: dict) -> AllocationConfig:
    """``config`` (or the defaults) with ``strategy`` and any field given by keyword replaced."""
    unknown = sorted(set(options) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"allocate() got unknown option(s) {', '.join(unknown)}; the options are AllocationConfig's: "
                        f"{', '.join(CONFIG_FIELDS)}")
    if strategy is not None:
        options = {**options, "strategy": strategy}
    return replace(config or AllocationConfig(), **options)


def allocate(
    model_or_path: nn.Module | str | Path,
    strategy: str | None = None,
    *,
    avg_bits: float | None = None,
    max_bytes: int | None = None,
    reference: nn.Module | str | Path | None = None,
    calibration: torch.Tensor | str | Path | None = None,
    damage: DamageTable | None = None,
    config: AllocationConfig | None = None,
    executor: Executor | None = None,
    **options,
) -> BitPlan:
    """Choose a width for every routed expert of every MoE layer and return the BitPlan.

    Args:
        model_or_path: a loaded model, or a checkpoint folder (read lazily where possible).
        strategy: one of :data:`STRATEGIES` (default: ``config``'s, router-maxvar).
        avg_bits / max_bytes: the budget, exactly one: mean expert bits, or the true bytes of
            the whole quantized model.
        reference: the initial or pre-trained checkpoint (folder or model) for Λ; without it the
            final router norm stands in, and the plan records which was used.
        calibration: token ids ``[sequences, length]``, a text file (tokenized with the model's
            tokenizer), or ``"default"`` for the project's corpus (calibration split), for the
            calibration-based strategies and ``weighted_error``. Never used unless given: the
            data-free strategies stay data-free.
        damage: a damage table already computed for these widths (``auto`` reuses it).
        config: an :class:`AllocationConfig`; ``**options`` are its fields, given by keyword
            (``levels=(3, 2)``), and replace the config's.
        executor: where ``auto``'s damage jobs (one per expert) run (:mod:`moeq.executors`); the
            plan is the same whichever runs them.
    """
    config = _resolve_config(config, strategy, options)
    strategy, levels, target = config.strategy, config.levels, get_target(config.target, config.scheme, config.group_size)
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if (avg_bits is None) == (max_bytes is None):
        raise PlanError("give exactly one budget: avg_bits (--avg-bits) or max_bytes (--max-bytes / --max-gb)")
    if (strategy in CALIBRATED_STRATEGIES or config.weighted_error) and calibration is None and damage is None:
        raise PlanError(f"--strategy {strategy}{' with --weighted-error' if config.weighted_error else ''} needs calibration text: "
                        "pass --calib FILE (or --calib default for moeq's Shakespeare corpus)")
    if levels is None:
        if target.free:
            levels = AUTO_LEVELS if strategy == "auto" else DEFAULT_LEVELS
        else:
            preferred = TARGET_AUTO_LEVELS if strategy in ("auto", "error-ilp") else TARGET_LEVELS
            levels = tuple(b for b in preferred if b in target.widths)
            levels = levels if len(levels) >= 2 else target.widths  # vLLM's 8 and 4
    if not target.free and set(levels) - set(target.widths):
        raise PlanError(f"--target {target.name} has levels {','.join(map(str, target.widths))}; "
                        f"{','.join(map(str, sorted(set(levels) - set(target.widths), reverse=True)))} is not one of them")
    source = open_source(model_or_path)
    layers = source.layers
    num_experts = min(layer.num_experts for layer in layers)
    widths = tuple(sorted({int(b) for b in levels}, reverse=True))
    if strategy != "uniform":
        validate_levels(tuple(levels), num_experts, avg_bits if target.free else None, counted=strategy in (*ORDER_STRATEGIES, "pmq"))
    scores: dict[str, object] = {}
    method: dict[str, object] = {
        "strategy": strategy, "levels": list(widths), "scheme": config.scheme, "group_size": config.group_size, "clip_search": config.clip_search,
        "one_bit_scheme": "sign", "avg_bits_requested": avg_bits, "max_bytes_requested": max_bytes,
    }
    if not target.free:
        method.update(scheme="the target's types", group_size=None, one_bit_scheme=None)
        method["target"] = {"name": target.name, "granularity": target.granularity, "runtime": target.runtime}
        if strategy not in ("auto", "error-ilp"):
            stack = "(layer, projection)" if target.granularity == "tensor" else "MoE layer"
            method["target"]["widening"] = (f"the strategy's widths per expert, then per {stack} the largest "
                                            "level whose stack fits the bytes its experts' own widths would take")

    def spec(bits: int, in_features: int | None = None) -> TensorSpec:
        if target.free:
            return _one_bit_aware_spec(bits, config.scheme, config.group_size, config.clip_search)
        base = target.spec_at(bits, in_features)
        return TensorSpec(base.bits, base.scheme, base.group_size, config.clip_search)

    linears = linear_specs(source.budget_model, config.other_linears) if config.other_linears is not None else {}
    if not target.free:  # attention and other linears take the target's type at their width too
        linears = {name: target.spec_at(s.bits, source.budget_model.get_submodule(name).weight.shape[1]) for name, s in linears.items()}
    model_dtype = str(next(iter(source.budget_model.parameters())).dtype).removeprefix("torch.")
    scale_dtype = target.scale_dtype_for(model_dtype)
    if not target.free and avg_bits is not None and strategy != "uniform":
        # The budget counts the file's true bytes: avg_bits expert bits per weight, plus the rest as is.
        expert_weights = sum(layer.expert_numel * layer.num_experts for layer in layers)
        probe = BitPlan(source.budget_model.config.model_type, [layer.path for layer in layers], [], linears, scale_dtype)
        unquantized = plan_budget(source.budget_model, probe)
        fixed = unquantized["model_bytes"] - unquantized["expert_bytes"]
        max_bytes, avg_bits = int(fixed + avg_bits * expert_weights / 8), None

    stats = None
    if (strategy in CALIBRATED_STRATEGIES and strategy != "auto") or config.weighted_error:
        stats = routing_statistics(source, model_or_path, calibration, config.calib_tokens, config.seq_len, config.weighted_error, method)
        layers = source.layers  # in memory now, if the checkpoint had to be loaded
        scores["frequency"] = stats.frequency.tolist()
        scores["mean_routing_weight"] = stats.mean_weight.tolist()

    orders: list[list[int]] | None = None
    if strategy in ORDER_RULES or strategy == "auto":  # auto ranks the experts calibration never reaches by the paper's order
        context = _OrderContext(source, layers, reference, stats, config.zeta, config.maxvar_variant, config.seed, scores, method)
        orders = ORDER_RULES["router-maxvar" if strategy == "auto" else strategy](context)

    errors = None
    if strategy == "auto":
        prior_orders, orders = orders, None  # the paper's order only ranks experts calibration never reaches
        if damage is None:
            token_ids = _calibration_ids(source, calibration, config.calib_tokens, config.seq_len, method)
            positions = [[order.index(e) for e in range(len(order))] for order in prior_orders]
            settings = config.gptq or CalibrationConfig()
            damage = damage_table(
                source.model if source.model is not None else source.lazy, token_ids, widths, spec, positions, config.damage_quantizer,
                options=settings.gptq_options, min_tokens=settings.min_tokens, per_projection=target.granularity == "tensor",
                executor=executor,
            )
        elif tuple(damage.widths) != widths:
            raise PlanError(f"the damage table covers widths {list(damage.widths)}, the levels are {list(widths)}")
        elif target.granularity == "tensor" and not damage.projection_damage:
            raise PlanError(f"--target {target.name} needs a damage table with each projection's damage (per_projection=True)")
        errors = damage.damage
        scores["predicted_damage"] = damage.to_json()
        scores["calibration_tokens"] = damage.tokens
        method["damage"] = {
            "quantizer": damage.quantizer,
            "definition": "sum over routed calibration tokens of routing weight^2 * |expert output change|^2, "
                          "relative to the layer's routed output energy"
                          + (", times the layer's probed KL per unit damage at that width" if damage.sensitivity else
                             "; not calibrated by probes (the model is too large to hold in memory)"),
            "prior_experts": [[i, e] for i, row in enumerate(damage.prior) for e, flag in enumerate(row) if flag],
            "prior": "median damage per unit weight error of the layer x own weight error x (E - position)/E "
                     "in the router-norm-change/MaxVar order",
        }
    projection_errors = None
    if strategy in ("pmq", "error-ilp"):
        projection_errors = _errors(layers, widths, spec, stats if config.weighted_error else None)
        errors = [[[sum(parts) for parts in expert] for expert in layer_err] for layer_err in projection_errors]
        scores["error"] = {str(b): [[float(e[j]) for e in layer_err] for layer_err in errors] for j, b in enumerate(widths)}
        method["error"] = "squared Frobenius norm of W - Q(W), summed over the expert's projections" + (
            ", weighted by calibration input second moments" if config.weighted_error else ""
        )
    if strategy == "pmq":
        method.update(pmq_alpha=config.pmq_alpha, pmq_beta=config.pmq_beta)

    def widths_at(avg: float) -> list[list[int]]:
        if strategy == "uniform":
            return [[int(avg)] * layer.num_experts for layer in layers]
        if orders is not None:
            return [widths_from_order(order, level_counts(avg, widths, layer.num_experts)) for order, layer in zip(orders, layers)]
        if strategy == "pmq":
            return [
                pmq_layer(stats.frequency[i, : layer.num_experts], stats.mean_weight[i, : layer.num_experts], np.array(errors[i]), widths, avg, config.pmq_alpha, config.pmq_beta)
                for i, layer in enumerate(layers)
            ]
        return _error_ilp_widths(layers, widths, errors, avg_bits=avg)

    def build(chosen: list[list[int]] | dict[tuple[int, int], int]) -> BitPlan:
        if not isinstance(chosen, dict) and target.granularity != "expert":
            chosen = _widen(layers, chosen, target)
        if isinstance(chosen, dict):  # a width per (layer, projection index)
            def width(layer: MoELayer, e: int, p: int) -> int:
                return chosen[(layer.index, p)]
        else:
            def width(layer: MoELayer, e: int, p: int) -> int:
                return chosen[layer.index][e]
        entries = [
            ExpertEntry(layer.index, e, name, spec(width(layer, e, p), layer.shapes[name][1]))
            for layer in layers for e in range(layer.num_experts) for p, name in enumerate(layer.projections)
        ]
        plan = BitPlan(source.budget_model.config.model_type, [layer.path for layer in layers], entries, linears, scale_dtype)
        plan.budget = plan_budget(source.budget_model, plan)
        if not target.free:  # the target file's own bytes (compressed-tensors' int32 words differ a little from moeq's)
            in_file = _target_expert_bytes(plan, layers, target)
            plan.budget["model_bytes"] += in_file - plan.budget["expert_bytes"]
            plan.budget["expert_bytes"] = in_file
        return plan

    tensor_levels = None  # the level of each (layer, projection), when a tensor ILP chose them
    if strategy in ("error-ilp", "auto") and not target.free:
        group_errors = _stack_errors(layers, target, projection_errors, damage if strategy == "auto" else None)
        tensor_levels = _tensor_ilp(layers, widths, group_errors, target, max_bytes, build)
        plan = build(tensor_levels)
    elif strategy in ("error-ilp", "auto") and max_bytes is not None:
        plan = build(_error_ilp_widths(layers, widths, errors, max_bytes=max_bytes, spec=spec, build=build))
    elif max_bytes is not None:
        # uniform takes any whole width (the target's, if it has fixed types); the others their levels
        candidates = (target.widths or tuple(range(8, 0, -1))) if strategy == "uniform" else widths
        plan = _fit_bytes(build, widths_at, candidates, max_bytes, integer=strategy == "uniform")
    else:
        if strategy == "uniform" and (avg_bits != int(avg_bits) or not 1 <= avg_bits <= 8):
            raise CountError(f"uniform needs a whole number of bits from 1 to 8, got {avg_bits}")
        if strategy == "uniform" and not target.free and int(avg_bits) not in target.widths:
            raise CountError(f"--target {target.name} runs {','.join(map(str, target.widths))} bits; uniform at {avg_bits:g} is not one of them")
        plan = build(widths_at(avg_bits))
    plan.method = method
    plan.method["bytes_read"] = source.bytes_read()
    plan.scores = scores
    plan.budget["expert_bits_per_weight"] = plan.budget["expert_bytes"] * 8 / sum(layer.expert_numel * layer.num_experts for layer in layers)
    if damage is not None:
        if target.free:
            chosen = [[plan.expert_specs(layer.index)[(e, layer.projections[0])].bits for e in range(layer.num_experts)] for layer in layers]
            plan.budget["predicted_damage"] = damage.total(chosen)
        elif tensor_levels is not None:
            # levels, not the types' bits: a level's fallback type may have more bits (Q8_0 for 6-bit rows of 384)
            plan.budget["predicted_damage"] = (damage.tensor_total(tensor_levels) if target.granularity == "tensor" else
                                               damage.total([[tensor_levels[(layer.index, 0)]] * layer.num_experts for layer in layers]))
            # What the runtime's one-type-per-tensor rule costs: the same types chosen per expert instead.
            free = _error_ilp_widths(layers, widths, damage.damage, max_bytes=max_bytes, spec=spec, build=build)
            plan.budget["predicted_damage_with_a_width_per_expert"] = damage.total(free)
    if tensor_levels is not None:
        plan.method["target"]["levels"] = {f"{plan.layers[layer]} {layers[layer].projections[p]}": b
                                           for (layer, p), b in tensor_levels.items()}
    if not target.free:
        target.check_plan(plan, [layer.shapes for layer in layers])
    return plan


@dataclass
class _OrderContext:
    """What an order rule may read, and where it records its scores and settings."""

    source: _Source
    layers: list[MoELayer]
    reference: object
    stats: object  # RoutingStats, for the calibration-based rules
    zeta: float
    maxvar_variant: str
    seed: int
    scores: dict
    method: dict


def _paper_orders(c: _OrderContext) -> list[list[int]]:
    """router-maxvar: Λ ascending, then one pass of ζ-promotion by MaxVar (PAPERS.md §1)."""
    change = router_signal(c.source, c.layers, c.reference, c.scores, c.method)
    maxvars = _maxvars(c.layers, c.maxvar_variant)
    c.scores["maxvar"] = maxvars
    results = [router_maxvar_order(ch, v, c.zeta) for ch, v in zip(change, maxvars)]
    c.method.update(zeta=c.zeta, maxvar_variant=c.maxvar_variant, promoted=[moved for _, moved in results])
    return [order for order, _ in results]


def _router_orders(c: _OrderContext) -> list[list[int]]:
    return [ascending_order(ch) for ch in router_signal(c.source, c.layers, c.reference, c.scores, c.method)]


def _variance_orders(c: _OrderContext) -> list[list[int]]:
    maxvars = _maxvars(c.layers, c.maxvar_variant)
    c.scores["maxvar"] = maxvars
    c.method["maxvar_variant"] = c.maxvar_variant
    return [ascending_order(v) for v in maxvars]


def _frequency_orders(c: _OrderContext) -> list[list[int]]:
    return [descending_order(c.stats.frequency[i, : layer.num_experts].tolist()) for i, layer in enumerate(c.layers)]


def _routing_weight_orders(c: _OrderContext) -> list[list[int]]:
    return [descending_order(c.stats.mean_weight[i, : layer.num_experts].tolist()) for i, layer in enumerate(c.layers)]


def _random_orders(c: _OrderContext) -> list[list[int]]:
    rng = random.Random(c.seed)
    c.method["seed"] = c.seed
    return [random_order(layer.num_experts, rng) for layer in c.layers]


# The ranking strategies: each orders every layer's experts (first = most bits); the count rules
# then give the widths. A new ranking is one entry here.
ORDER_RULES: dict[str, Callable[[_OrderContext], list[list[int]]]] = {
    "router-maxvar": _paper_orders,
    "router": _router_orders,
    "variance": _variance_orders,
    "frequency": _frequency_orders,
    "routing-weight": _routing_weight_orders,
    "random": _random_orders,
}


def router_signal(source: _Source, layers: list[MoELayer], reference, scores: dict, method: dict) -> list[list[float]]:
    """Λ per layer and expert (or the final-norm proxy), recorded in ``scores`` and ``method``."""
    opaque = next((layer for layer in layers if layer.router_weight is None), None)
    if opaque is not None:
        raise PlanError(f"{opaque.router_path} is a router network, not an [experts, hidden] matrix, so it has no per-expert norm; "
                        "the router strategies need one: use --strategy auto, variance, frequency or routing-weight")
    if reference is None and source.folder is not None and (source.folder / INITIAL_ROUTER_FILE).is_file():
        reference = source.folder / INITIAL_ROUTER_FILE  # the checkpoint ships its initial routers
    adapter = getattr(source.lazy, "adapter", None) or moe_layers_or_error(source.budget_model)[0]
    if reference is not None and not isinstance(reference, nn.Module) and (Path(reference) / ROUTER_TUNE_FILE).is_file():
        # A `moeq train-router` output of this model: its routers are the "after" of a measured fine-tune.
        tuned = _reference_routers(reference, layers, adapter)
        change = [router_norm_change(after, layer.router_weight).tolist() for layer, after in zip(layers, tuned)]
        method["router_signal"] = f"norm change of the router-only fine-tune {reference}"
    else:
        initial = _reference_routers(reference, layers, adapter) if reference is not None else [None] * len(layers)
        change = [router_norm_change(layer.router_weight, ref).tolist() for layer, ref in zip(layers, initial)]
        method["router_signal"] = (
            f"norm change against the reference {reference if not isinstance(reference, nn.Module) else 'model'}"
            if reference is not None else PROXY_SIGNAL
        )
    scores["router_norm_change" if reference is not None else "router_final_norm"] = change
    return change


def _maxvars(layers: list[MoELayer], variant: str) -> list[list[float]]:
    first = [layer.projections[0] for layer in layers]
    return [[max_var(layer.expert_weight(e, p), variant) for e in range(layer.num_experts)] for layer, p in zip(layers, first)]


def _errors(layers, widths, spec, stats) -> list[list[list[list[float]]]]:
    """``[layer][expert][width index][projection]`` squared error of each projection at each width."""
    out = []
    for layer in layers:
        per_expert = []
        for e in range(layer.num_experts):
            weights = {p: layer.expert_weight(e, p) for p in layer.projections}
            row = []
            for b in widths:
                parts = []
                for p, w in weights.items():
                    moment = stats.input_second_moment(layer.index, e, p) if stats is not None else None
                    parts.append(quantization_error(w, spec(b, w.shape[1]), moment))
                row.append(parts)
            per_expert.append(row)
        out.append(per_expert)
    return out


def _error_ilp_widths(layers, widths, errors, avg_bits=None, max_bytes=None, spec=None, build=None) -> list[list[int]]:
    flat_errors = np.array([row for layer_err in errors for row in layer_err])
    sizes = np.array([layer.expert_numel for layer in layers for _ in range(layer.num_experts)], dtype=np.float64)
    if avg_bits is not None:
        spend = sizes[:, None] * np.array(widths, dtype=np.float64)[None, :]
        budget = avg_bits * sizes.sum() + 1e-6
    else:
        base = build([[min(widths)] * layer.num_experts for layer in layers])
        fixed = base.budget["model_bytes"] - base.budget["expert_bytes"]
        spend = np.array([
            [_expert_bytes(layer, lambda n, b=b: spec(b, n), base) for b in widths] for layer in layers for _ in range(layer.num_experts)
        ])
        budget = max_bytes - fixed
        if spend[:, -1].sum() > budget:
            raise CountError(
                f"a budget of {max_bytes:,} bytes is impossible: the smallest plan at {min(widths)} bits takes "
                f"{base.budget['model_bytes']:,} bytes"
            )
    chosen = error_ilp(flat_errors, widths, spend, budget)
    out, k = [], 0
    for layer in layers:
        out.append(chosen[k : k + layer.num_experts])
        k += layer.num_experts
    return out


def _expert_bytes(layer: MoELayer, spec: Callable[[int], TensorSpec], plan: BitPlan) -> float:
    """True bytes of one expert with each projection at ``spec(in_features)``."""
    from ..quant.rtn import resolve_group_size
    from ..quant.tensor import storage_nbytes

    scale_bytes = torch.empty(0, dtype=getattr(torch, plan.scale_dtype)).element_size()
    total = 0
    for shape in layer.shapes.values():
        s = spec(shape[1])
        total += storage_nbytes(shape, s.bits, resolve_group_size(shape[1], s.group_size, s.scheme), s.scheme, scale_bytes)
    return float(total)


def _stacks(layers: list[MoELayer], target: Target) -> list[tuple[MoELayer, tuple[int, ...]]]:
    """The expert stacks that share one type: per (layer, projection), or per MoE layer."""
    if target.granularity == "layer":
        return [(layer, tuple(range(len(layer.projections)))) for layer in layers]
    return [(layer, (p,)) for layer in layers for p in range(len(layer.projections))]


def _stack_bytes(layer: MoELayer, projections: tuple[int, ...], target: Target, bits: int) -> int:
    """Bytes of one expert's ``projections`` at level ``bits`` in the target's file."""
    shapes = [layer.shapes[layer.projections[p]] for p in projections]
    return sum(target.type_at(bits, shape[1]).nbytes(shape) for shape in shapes)


def _target_expert_bytes(plan: BitPlan, layers: list[MoELayer], target: Target) -> int:
    """Bytes of the plan's routed experts as the target's file holds them."""
    total = 0
    for entry in plan.experts:
        shape = layers[entry.layer].shapes[entry.projection]
        kind = target.type_of(entry.spec, shape[1])
        total += kind.nbytes(shape) if kind is not None else 0
    return total


def _widen(layers: list[MoELayer], chosen: list[list[int]], target: Target) -> dict[tuple[int, int], int]:
    """Per-expert widths made one per expert stack (see :func:`_stacks`): the largest level whose
    bytes for the whole stack fit what its experts' own widths would take (the smallest if none does)."""
    out = {}
    for layer, projections in _stacks(layers, target):
        share = sum(_stack_bytes(layer, projections, target, chosen[layer.index][e]) for e in range(layer.num_experts))
        fitting = [b for b in target.widths if _stack_bytes(layer, projections, target, b) * layer.num_experts <= share]
        for p in projections:
            out[(layer.index, p)] = max(fitting) if fitting else min(target.widths)
    return out


def _stack_errors(layers: list[MoELayer], target: Target, errors, damage: DamageTable | None) -> list[list[float]]:
    """``[stack][width index]`` for the stacks of :func:`_stacks`, summed over their experts: the
    predicted damage (``auto``: each projection alone for a tensor stack, the whole expert for a
    layer stack), else the squared weight error."""
    out = []
    for layer, projections in _stacks(layers, target):
        if damage is not None and target.granularity == "layer":
            out.append([sum(row[j] for row in damage.damage[layer.index]) for j in range(len(damage.widths))])
        elif damage is not None:
            out.append([damage.tensor_damage(layer.index, projections[0], b) for b in damage.widths])
        else:
            rows = errors[layer.index]
            out.append([sum(expert[j][p] for expert in rows for p in projections) for j in range(len(rows[0]))])
    return out


def _tensor_ilp(layers, widths, group_errors, target: Target, max_bytes: int, build) -> dict[tuple[int, int], int]:
    """One level per expert stack (see :func:`_stacks`): least total error within ``max_bytes``."""
    stacks = _stacks(layers, target)
    flat = np.array(group_errors)
    spend = np.array([[float(_stack_bytes(layer, projections, target, b) * layer.num_experts) for b in widths]
                      for layer, projections in stacks])
    base = build({(layer.index, p): min(widths) for layer, projections in stacks for p in projections})
    fixed = base.budget["model_bytes"] - base.budget["expert_bytes"]
    if spend[:, -1].sum() > max_bytes - fixed:
        raise CountError(f"a budget of {max_bytes:,} bytes is impossible: the smallest plan at {min(widths)} bits takes "
                         f"{base.budget['model_bytes']:,} bytes")
    chosen = error_ilp(flat, widths, spend, max_bytes - fixed)
    return {(layer.index, p): b for (layer, projections), b in zip(stacks, chosen) for p in projections}


def _smallest_feasible(widths_at, low: float, high: float) -> float:
    """The least mean width the strategy can plan at (pmq keeps one expert at each top width)."""
    try:
        widths_at(low)
        return low
    except AllocationInfeasible:
        pass
    for _ in range(30):  # feasibility only grows with the mean width
        middle = (low + high) / 2
        try:
            widths_at(middle)
            high = middle
        except AllocationInfeasible:
            low = middle
    return high


def _fit_bytes(build, widths_at, widths, max_bytes: int, integer: bool) -> BitPlan:
    """The plan with the largest average width whose true model bytes fit ``max_bytes``."""
    low, high = float(min(widths)), float(max(widths))
    if not integer:
        low = _smallest_feasible(widths_at, low, high)
    smallest = build(widths_at(low))
    if smallest.budget["model_bytes"] > max_bytes:
        raise CountError(
            f"a budget of {max_bytes:,} bytes is impossible: the smallest plan at {low:g} bits takes "
            f"{smallest.budget['model_bytes']:,} bytes"
        )
    if integer:  # the largest whole width that fits
        for bits in sorted(widths, reverse=True):
            plan = build(widths_at(bits))
            if plan.budget["model_bytes"] <= max_bytes:
                return plan
    best = smallest
    for _ in range(40):
        middle = (low + high) / 2
        plan = build(widths_at(middle))
        if plan.budget["model_bytes"] <= max_bytes:
            best, low = plan, middle
        else:
            high = middle
    top = build(widths_at(float(max(widths))))
    return top if top.budget["model_bytes"] <= max_bytes else best


def routing_statistics(source: _Source, model_or_path, calibration, calib_tokens: int, seq_len: int, moments: bool, method: dict):
    """Routing statistics: block by block from a checkpoint folder (one block in memory), or one
    pass through a model already in memory."""
    from ..calibrate.routing import collect_routing
    from ..calibrate.runner import collect_routing_streaming

    token_ids = _calibration_ids(source, calibration, calib_tokens, seq_len, method)
    if source.model is not None:
        stats = collect_routing(source.model, token_ids, input_moments=moments)
        method["calibration"]["pass"] = "whole model in memory"
    else:
        stats = collect_routing_streaming(source.lazy, token_ids, input_moments=moments)
        method["calibration"]["pass"] = "layer by layer from the checkpoint"
    method["calibration"]["tokens"] = stats.tokens
    return stats


def _calibration_ids(source: _Source, calibration, calib_tokens: int, seq_len: int, method: dict) -> torch.Tensor:
    """Calibration token ids from ``calibration`` (ids, or a text file, or the default corpus)."""
    from ..calibrate.routing import is_default_corpus, tokenize_calibration

    if calibration is None:
        raise PlanError("this strategy needs calibration text: pass --calib FILE (or --calib default for moeq's "
                        "Shakespeare corpus, or token ids to moeq.allocate)")
    default = is_default_corpus(calibration)
    if isinstance(calibration, torch.Tensor):
        token_ids = calibration
        method["calibration"] = {"source": "token ids"}
    else:
        if source.folder is None:
            raise PlanError("calibration text needs a tokenizer: pass the model folder, or token ids with an in-memory model")
        token_ids = tokenize_calibration(source.folder, calibration, calib_tokens, seq_len)
        method["calibration"] = {"source": "moeq's default corpus (--calib default)" if default else str(calibration)}
    method["calibration"].update(sequences=int(token_ids.shape[0]), sequence_length=int(token_ids.shape[1]))
    return token_ids
