"""Predicted damage: what quantizing one routed expert at one width does to its layer's output.

For expert ``e`` of a MoE layer and a candidate width ``b``, with the calibration tokens ``t`` its
router sends it, their routing weights ``g_t`` and inputs ``x_t``:

    D(e, b) = Σ_t g_t² ‖f_e^b(x_t) − f_e(x_t)‖²

where ``f_e`` is the expert (``down(act(gate x) · up x)``) and ``f_e^b`` the same expert with every
projection quantized at ``b`` by the quantizer that will really run: rounding (the plan's scheme,
1-bit experts as sign codes) or GPTQ (Hessians from the same routed inputs; the down projection
fitted on the quantized gate/up outputs, as :mod:`moeq.calibrate.runner` does it). It is the
expert's share of the change of the layer's output, exactly, on the calibration tokens; the sum
over experts ignores the cross terms between two experts of the same token. Inputs come from the
original model, layer by layer (one block in memory for a checkpoint folder): no forward pass of
the whole model per candidate.

Per expert at most ``max_rows`` routed rows are kept (the first ones, in calibration order); the
damage is scaled by ``tokens / rows kept``. Layers are made comparable by dividing by the layer's
routed output energy ``Σ_t Σ_e g_t,e² ‖f_e(x_t)‖²`` (a relative error): measured on the default
model, this ranks plans by KL better than the absolute error (BENCHMARKS.md).

Then, when the model fits in memory, the table is calibrated into KL units: one probe per
layer and width (that layer's experts all rounded at that width, the rest original) measures the
KL to the original model on a few calibration sequences, and the layer's damage at that width is
scaled by KL / damage (:func:`layer_sensitivity`). On the default model this turns a Spearman ρ of
0.84 between predicted damage and measured test KL into 0.96 (BENCHMARKS.md): early layers and
1-bit experts cost more than their own output change says.

Experts calibration never reaches get a data-free prior: the median damage per unit of weight
error of the layer's reached experts, times the expert's own weight error ``‖W − Q_b(W)‖²``, times
``(E − p) / E`` with ``p`` its position in the paper's router-norm-change/MaxVar order (first =
would get the most bits). The table says which experts got the prior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate.hessian import HessianSum
from ..executors import Executor, SerialExecutor
from ..kernels.reference import expert_hidden, project
from ..models import MoEAdapter, MoELayer
from ..modules.recipe import GPTQOptions, LayerJob, WeightJob, expert_method, quantize_layer
from ..plan import TensorSpec
from ..threads import threads_pinned

__all__ = ["DAMAGE_QUANTIZERS", "DamageTable", "RoutedInputs", "layer_damage", "damage_table", "layer_sensitivity", "predicted_damage", "predicted_damages", "probe_ids"]

DAMAGE_QUANTIZERS = ("rtn", "gptq")


@dataclass
class DamageTable:
    """Predicted damage ``[layer][expert][width index]`` and where each estimate came from."""

    widths: tuple[int, ...]
    damage: list[list[list[float]]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    prior: list[list[bool]] = field(default_factory=list)  # True: no calibration token, the prior stands in
    quantizer: str = "rtn"
    sensitivity: list[list[float]] | None = None  # [layer][width index] KL per unit damage, once applied
    # [layer][expert][width index][projection]: the damage of that projection alone at that width (the
    # others original), for plans that choose a width per (layer, projection)
    projection_damage: list[list[list[list[float]]]] = field(default_factory=list)

    def layer_totals(self, chosen: list[list[int]]) -> list[float]:
        """Predicted damage per layer of a plan given as a width per (layer, expert)."""
        column = {b: j for j, b in enumerate(self.widths)}
        missing = sorted({b for row in chosen for b in row} - set(column))
        if missing:
            raise ValueError(f"the plan uses widths {missing} that the damage table was not computed for {self.widths}")
        return [sum(layer[e][column[b]] for e, b in enumerate(row)) for layer, row in zip(self.damage, chosen)]

    def total(self, chosen: list[list[int]]) -> float:
        return sum(self.layer_totals(chosen))

    def tensor_damage(self, layer: int, projection: int, width: int) -> float:
        """Predicted damage of one (layer, projection) expert stack at ``width``, every expert."""
        j = self.widths.index(width)
        return sum(row[j][projection] for row in self.projection_damage[layer])

    def tensor_total(self, chosen: dict[tuple[int, int], int]) -> float:
        """Predicted damage of a plan given as a width per (layer, projection index)."""
        return sum(self.tensor_damage(layer, p, bits) for (layer, p), bits in chosen.items())

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "quantizer": self.quantizer, "damage": self.damage,
                "tokens": self.tokens, "prior": self.prior, "sensitivity": self.sensitivity,
                "projection_damage": self.projection_damage}

    @classmethod
    def from_json(cls, data: dict) -> DamageTable:
        return cls(tuple(data["widths"]), data["damage"], data["tokens"], data["prior"], data["quantizer"], data.get("sensitivity"),
                   data.get("projection_damage") or [])

    def calibrate(self, sensitivity: list[list[float]]) -> None:
        """Scale every layer's and width's damage by its measured KL per unit damage."""
        self.damage = [[[d * sensitivity[i][j] for j, d in enumerate(row)] for row in layer] for i, layer in enumerate(self.damage)]
        self.projection_damage = [
            [[[d * sensitivity[i][j] for d in parts] for j, parts in enumerate(row)] for row in layer]
            for i, layer in enumerate(self.projection_damage)
        ]
        self.sensitivity = sensitivity


class RoutedInputs:
    """A forward pre-hook target: keeps, per expert, the first ``max_rows`` routed inputs and
    their routing weights, counts every routed token, and sums the routing weights squared."""

    def __init__(self, adapter: MoEAdapter, layer: MoELayer, max_rows: int) -> None:
        self.adapter, self.layer, self.max_rows = adapter, layer, max_rows
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(layer.num_experts)]
        self.weights: list[list[torch.Tensor]] = [[] for _ in range(layer.num_experts)]
        self.kept = [0] * layer.num_experts
        self.counts = [0] * layer.num_experts

    def __call__(self, module: nn.Module, args: tuple) -> None:
        hidden, index, weights = self.adapter.routing_of_call(self.layer, args)
        for expert in range(self.layer.num_experts):
            hit = index == expert
            rows = hit.any(dim=-1)
            count = int(rows.sum())
            if count == 0:
                continue
            self.counts[expert] += count
            room = self.max_rows - self.kept[expert]
            if room <= 0:
                continue
            take = rows.nonzero().squeeze(-1)[:room]
            self.inputs[expert].append(hidden[take].detach().to(torch.float32))
            self.weights[expert].append((weights * hit).sum(dim=-1)[take].detach().to(torch.float32))
            self.kept[expert] += take.numel()

    def rows(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept inputs ``[rows, hidden]`` and routing weights ``[rows]`` of ``expert``."""
        if not self.inputs[expert]:
            return torch.zeros(0, self.layer.shapes[self.layer.projections[0]][1]), torch.zeros(0)
        return torch.cat(self.inputs[expert]), torch.cat(self.weights[expert])


def _expert_output(job: ExpertDamageJob, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    *first, down = weights
    *first_bias, down_bias = job.biases or (None,) * len(weights)
    return project(_hidden(job, first, first_bias, x), down, down_bias)


def _hidden(job: ExpertDamageJob, first: list[torch.Tensor], biases, x: torch.Tensor) -> torch.Tensor:
    return expert_hidden([project(x, w, b) for w, b in zip(first, biases, strict=True)], job.act_fn, job.gated)


@dataclass(frozen=True)
class ExpertDamageJob:
    """One expert's part of the damage table as plain, picklable data: its weights (float32, one per
    projection), the routed inputs kept for it and their routing weights, the spec of each (width,
    input size), the method the runner will give it, and what to measure."""

    weights: tuple[torch.Tensor, ...]
    inputs: torch.Tensor  # [rows, hidden]
    routing: torch.Tensor  # [rows]
    scale: float  # routed tokens / kept rows: the kept rows stand for every routed token
    widths: tuple[int, ...]
    specs: dict[tuple[int, int], TensorSpec]  # (bits, in_features) -> spec
    method: str
    act_fn: object
    gated: bool
    options: GPTQOptions = GPTQOptions()
    per_projection: bool = False
    threads: int | None = None  # intra-op threads to compute with (the scheduler's own: the same table anywhere)
    biases: tuple[torch.Tensor | None, ...] | None = None  # one per projection (float32), for experts with biases


@dataclass
class ExpertDamage:
    """What :func:`expert_damage` measured: per width, the routed output change, each projection's
    alone, the squared weight error and each projection's; and the expert's routed output energy."""

    damage: list[float]
    parts: list[list[float]]
    weight_error: list[float]
    part_error: list[list[float]]
    energy: float


def _quantized_weights(job: ExpertDamageJob, bits: int, hessian: HessianSum | None) -> list[torch.Tensor]:
    """Every projection of the expert quantized at ``bits`` as the runner would (the shared
    recipe), dequantized in float32; ``hessian``: of the routed inputs, for gate/up."""
    def quantized(weights: list[torch.Tensor], inputs: HessianSum | None) -> list[torch.Tensor]:
        matrix = inputs.matrix if inputs is not None and inputs.rows > 0 else None
        items = tuple(WeightJob(f"projection {i}", w, job.specs[(bits, w.shape[1])], job.method, matrix) for i, w in enumerate(weights))
        return [packed.dequantize(torch.float32) for packed in quantize_layer(LayerJob(items, options=job.options))]

    if job.method != "gptq":
        return quantized(list(job.weights), None)
    *first, down = job.weights
    upstream = quantized(first, hessian)
    h = _hidden(job, upstream, (job.biases or (None,) * len(job.weights))[:-1], job.inputs)
    down_hessian = HessianSum(h.shape[1])  # the down projection sees the quantized gate/up outputs
    down_hessian.add(h)
    return [*upstream, *quantized([down], down_hessian)]


def expert_damage(job: ExpertDamageJob) -> ExpertDamage:
    """The damage-table row of one expert: a pure function of the job, so any executor can run it."""
    with threads_pinned(job.threads), torch.no_grad():
        return _expert_damage(job)


def _expert_damage(job: ExpertDamageJob) -> ExpertDamage:
    originals, x, g = list(job.weights), job.inputs, job.routing
    projections = len(originals)
    reference = _expert_output(job, originals, x) if x.shape[0] else None
    energy = job.scale * float((reference.pow(2).sum(-1) * g.pow(2)).sum(dtype=torch.float64)) if reference is not None else 0.0
    hessian = None
    if job.method == "gptq":  # one Hessian of the routed inputs for every width of this expert
        hessian = HessianSum(x.shape[1])
        hessian.add(x)
    result = ExpertDamage([0.0] * len(job.widths), [[0.0] * projections for _ in job.widths], [0.0] * len(job.widths),
                          [[0.0] * projections for _ in job.widths], energy)
    for j, bits in enumerate(job.widths):
        quantized = _quantized_weights(job, bits, hessian)
        result.part_error[j] = [float((w - q).pow(2).sum(dtype=torch.float64)) for w, q in zip(originals, quantized)]
        result.weight_error[j] = sum(result.part_error[j])
        if reference is None:
            continue

        def routed_change(weights: list[torch.Tensor]) -> float:
            error = (_expert_output(job, weights, x) - reference).pow(2).sum(-1)
            return job.scale * float((error * g.pow(2)).sum(dtype=torch.float64))

        result.damage[j] = routed_change(quantized)
        if job.per_projection and projections > 1:  # each projection alone, the others original
            result.parts[j] = [routed_change(originals[:p] + [quantized[p]] + originals[p + 1:]) for p in range(projections)]
        else:
            result.parts[j] = [result.damage[j]]
    return result


def _expert_jobs(layer: MoELayer, routed: RoutedInputs, widths, spec, quantizer: str, min_tokens: int, options: GPTQOptions,
                 per_projection: bool):
    """One :class:`ExpertDamageJob` per expert of ``layer``, each read when the executor takes it."""
    specs = {(b, layer.shapes[p][1]): spec(b, layer.shapes[p][1]) for b in widths for p in layer.projections}
    for e in range(layer.num_experts):
        x, g = routed.rows(e)
        yield ExpertDamageJob(
            tuple(layer.expert_weight(e, p).detach().to(torch.float32) for p in layer.projections), x, g,
            routed.counts[e] / max(routed.kept[e], 1), tuple(widths), specs,
            expert_method(quantizer, routed.counts[e] < max(min_tokens, 1)), layer.act_fn, layer.gated, options, per_projection,
            torch.get_num_threads(),
            None if layer.expert_bias is None else tuple(layer.bias(e, p).detach().to(torch.float32) for p in layer.projections),
        )


@torch.no_grad()
def layer_damage(
    layer: MoELayer,
    routed: RoutedInputs,
    widths: tuple[int, ...],
    spec: Callable[[int, int], TensorSpec],
    prior_position: list[int],
    quantizer: str = "rtn",
    min_tokens: int = 16,
    normalize: bool = True,
    options: GPTQOptions = GPTQOptions(),
    per_projection: bool = False,
    executor: Executor | None = None,
) -> tuple[list[list[float]], list[bool], list[list[list[float]]]]:
    """``[expert][width index]`` predicted damage of one layer, which experts got the prior, and
    (with ``per_projection``, else empty) ``[expert][width index][projection]`` the damage of each
    projection quantized alone, for plans that choose a width per (layer, projection).

    ``spec(bits, in_features)``: the spec a projection with ``in_features`` inputs gets at ``bits``.
    ``prior_position[e]``: expert e's position in the data-free order (0 = most bits).
    ``min_tokens``: with GPTQ, experts routed fewer tokens are rounded (the runner's fallback).
    ``executor``: runs the experts' :func:`expert_damage` jobs (default: here, one after another).
    """
    if quantizer not in DAMAGE_QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r} for predicted damage; choose one of: {', '.join(DAMAGE_QUANTIZERS)}")
    experts = layer.num_experts
    jobs = _expert_jobs(layer, routed, widths, spec, quantizer, min_tokens, options, per_projection)
    rows = list((executor or SerialExecutor()).map(expert_damage, jobs))
    damage = [row.damage for row in rows]
    parts = [row.parts for row in rows]
    weight_error = [row.weight_error for row in rows]
    part_error = [row.part_error for row in rows]
    energy = sum(row.energy for row in rows)
    prior = [routed.counts[e] == 0 for e in range(experts)]
    if any(prior):
        ratios = sorted(
            damage[e][j] / weight_error[e][j]
            for e in range(experts) if not prior[e] for j in range(len(widths)) if weight_error[e][j] > 0
        )
        per_unit = ratios[len(ratios) // 2] if ratios else 1.0
        for e in range(experts):
            if prior[e]:
                factor = per_unit * (experts - prior_position[e]) / experts
                damage[e] = [factor * err for err in weight_error[e]]
                parts[e] = [[factor * err for err in row] for row in part_error[e]]
    if normalize and energy > 0:
        damage = [[d / energy for d in row] for row in damage]
        parts = [[[d / energy for d in row] for row in expert] for expert in parts]
    return damage, prior, parts if per_projection else []


def predicted_damage(source, token_ids: torch.Tensor, widths: tuple[int, ...], spec: Callable[[int, int], TensorSpec],
                     prior_positions: list[list[int]], quantizer: str = "rtn", **settings) -> DamageTable:
    """The :class:`DamageTable` of ``quantizer`` (see :func:`predicted_damages`)."""
    return predicted_damages(source, token_ids, widths, spec, prior_positions, (quantizer,), **settings)[0]


@torch.no_grad()
def predicted_damages(
    source,
    token_ids: torch.Tensor,
    widths: tuple[int, ...],
    spec: Callable[[int, int], TensorSpec],
    prior_positions: list[list[int]],
    quantizers: tuple[str, ...] = ("rtn",),
    max_rows: int = 4096,
    min_tokens: int = 16,
    normalize: bool = True,
    batch_size: int = 8,
    options: GPTQOptions = GPTQOptions(),
    per_projection: bool = False,
    executor: Executor | None = None,
) -> list[DamageTable]:
    """One :class:`DamageTable` per quantizer in ``quantizers``, of every MoE layer of ``source``
    (a loaded model, or a :class:`~moeq.io.lazy.LazyModel` walked one block at a time) on
    ``token_ids``, all from the same walk; ``executor`` runs each layer's experts' jobs (the walk
    itself is sequential: a layer's inputs are the previous layer's outputs)."""
    from ..calibrate.runner import visit_moe_layers

    tables = [DamageTable(widths=tuple(widths), quantizer=q) for q in quantizers]
    results: dict[int, list[tuple]] = {}

    def finish(layer: MoELayer, routed: RoutedInputs) -> None:
        results[layer.index] = []
        for q in quantizers:
            damage, prior, parts = layer_damage(layer, routed, widths, spec, prior_positions[layer.index], q, min_tokens, normalize,
                                                options, per_projection, executor)
            results[layer.index].append((damage, list(routed.counts), prior, parts))

    if isinstance(source, nn.Module):
        from ..models import moe_layers_or_error

        adapter, layers = moe_layers_or_error(source)
        routed = {layer.index: RoutedInputs(adapter, layer, max_rows) for layer in layers}
        handles = [source.get_submodule(layer.experts_path).register_forward_pre_hook(routed[layer.index]) for layer in layers]
        try:
            for batch in token_ids.split(batch_size):
                extra = {"decoder_input_ids": batch} if source.config.is_encoder_decoder else {}
                source(input_ids=batch, **extra)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            finish(layer, routed[layer.index])
    else:
        def visit(layer: MoELayer, run: Callable) -> None:
            routed = RoutedInputs(source.adapter, layer, max_rows)
            run(routed)
            finish(layer, routed)

        visit_moe_layers(source, token_ids, visit, batch_size)
    for index in sorted(results):
        for table, (damage, tokens, prior, parts) in zip(tables, results[index]):
            table.damage.append(damage)
            table.tokens.append(tokens)
            table.prior.append(prior)
            table.projection_damage.append(parts)
    return tables


def _log_probs(model: nn.Module, token_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    for batch in token_ids.split(batch_size):
        extra = {"decoder_input_ids": batch} if model.config.is_encoder_decoder else {}
        out.append(torch.log_softmax(model(input_ids=batch, **extra).logits.float(), dim=-1).reshape(-1, model.config.vocab_size))
    return torch.cat(out)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module, token_ids: torch.Tensor, table: DamageTable, spec: Callable[[int, int], TensorSpec], batch_size: int = 8
) -> list[list[float]]:
    """KL to the original model per unit of predicted damage, per (layer, width), by probes.

    Why: the table prices each layer's own output change, but the same relative change costs far
    more in an early layer (it travels through every later one), and a 1-bit expert's error is
    not a small perturbation. One probe per layer and width (every expert of that layer alone
    rounded at that width, all else original; the top width is priced like the one below it)
    measures the ratio; damage times ratio approximates the KL each choice adds.
    """
    from ..models import moe_layers_or_error
    from ..modules.convert import quantize_experts

    adapter, layers = moe_layers_or_error(model)
    reference = _log_probs(model, token_ids, batch_size)
    reference_probs = reference.exp()
    probed = table.widths[1:] if len(table.widths) > 1 else table.widths
    sensitivity = []
    for layer in layers:
        ratios = {}
        parent, _, child = layer.experts_path.rpartition(".")
        owner = model.get_submodule(parent)
        original = getattr(owner, child)
        for bits in probed:
            specs = {(e, p): spec(bits, layer.shapes[p][1]) for e in range(layer.num_experts) for p in layer.projections}
            setattr(owner, child, quantize_experts(adapter, layer, specs, torch.float16))
            try:
                probe = _log_probs(model, token_ids, batch_size)
            finally:
                setattr(owner, child, original)
            kl = float((reference_probs * (reference - probe)).sum(-1).mean())
            j = table.widths.index(bits)
            damage = sum(row[j] for row in table.damage[layer.index])
            ratios[bits] = kl / damage if damage > 0 else 0.0
        sensitivity.append([ratios.get(b, ratios[probed[0]]) for b in table.widths])
    return sensitivity


SENSITIVITY_MAX_BYTES = 8 * 2**30  # probes need the model in memory; larger checkpoints skip them
PROBE_SEQUENCES = 16
PROBE_LENGTH = 256  # probes run PROBE_SEQUENCES windows of this length, whatever the calibration's


def probe_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """The probes' tokens: the first ``PROBE_SEQUENCES x PROBE_LENGTH`` calibration tokens, as
    windows of ``PROBE_LENGTH`` (shorter calibration sequences are kept as they are), so a probe
    costs the same whatever the sequence length GPTQ calibrates with."""
    length = min(token_ids.shape[1], PROBE_LENGTH)
    flat = token_ids.reshape(-1)[: PROBE_SEQUENCES * PROBE_LENGTH]
    return flat[: flat.numel() // length * length].view(-1, length)


def damage_table(
    source,
    token_ids: torch.Tensor,
    widths: tuple[int, ...],
    spec: Callable[[int, int], TensorSpec],
    prior_positions: list[list[int]],
    quantizer: str = "rtn",
    sensitivity_max_bytes: int = SENSITIVITY_MAX_BYTES,
    options: GPTQOptions = GPTQOptions(),
    min_tokens: int = 16,
    per_projection: bool = False,
    executor: Executor | None = None,
) -> DamageTable:
    """:func:`predicted_damage`, then calibrated by :func:`layer_sensitivity` when the model is in
    memory or its checkpoint is at most ``sensitivity_max_bytes`` (else left per-layer relative;
    ``table.sensitivity`` is None then)."""
    # The probes' ratios are over rounding's own damage; with GPTQ that table comes from the same walk.
    quantizers = (quantizer,) if quantizer == "rtn" else (quantizer, "rtn")
    tables = predicted_damages(source, token_ids, widths, spec, prior_positions, quantizers, min_tokens=min_tokens, options=options,
                               per_projection=per_projection, executor=executor)
    table, rounding = tables[0], tables[-1]
    model = source if isinstance(source, nn.Module) else None
    if model is None and sum(f.stat().st_size for f in source.folder.glob("*.safetensors")) <= sensitivity_max_bytes:
        from ..io.source import load_source

        model = load_source(source.folder)
    if model is not None:
        # The probes round, so their KL is divided by rounding's own predicted damage: KL per unit of
        # output change is a property of the layer and width, which the GPTQ table then inherits.
        table.calibrate(layer_sensitivity(model, probe_ids(token_ids), rounding, spec))
    return table
