"""The guard: a plan's predicted damage beside ``auto``, uniform, router-maxvar and frequency.

It informs and never blocks. One damage table (:mod:`.damage`) prices every plan (the one
``auto`` computed, when the plan has it), and ``frequency`` is ranked by that walk's own routed
token counts, so the comparison costs at most one calibration pass, and none after ``auto``; the
data-free plans (uniform, router-maxvar) read routers and one weight each. The rows are per layer
and in total, with a one-line verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..calibrate.runner import CalibrationConfig
from ..plan import BitPlan
from .api import AUTO_LEVELS, DEFAULT_LEVELS, PROXY_SIGNAL, AllocationConfig, _calibration_ids, _maxvars, _one_bit_aware_spec, allocate, open_source, router_signal
from .counts import CountError, level_counts
from .damage import DamageTable, damage_table
from .ranking import descending_order, router_maxvar_order, widths_from_order

__all__ = ["GuardRow", "GuardReport", "compare_plan", "uses_proxy"]

COMPARED = ("auto", "uniform", "router-maxvar", "frequency")


@dataclass
class GuardRow:
    strategy: str
    avg_bits: float
    model_bytes: int
    damage: float
    layers: list[float]
    note: str = ""


@dataclass
class GuardReport:
    rows: list[GuardRow]  # the chosen plan first
    quantizer: str
    verdict: str
    calibration: str = ""  # what the predictions were measured on


def uses_proxy(plan: BitPlan) -> bool:
    """Whether the plan ranked experts by the final router norm instead of the router-norm change."""
    return plan.method.get("router_signal") == PROXY_SIGNAL


def _widths(plan: BitPlan) -> list[list[int]]:
    out = []
    for index in range(len(plan.layers)):
        specs = plan.expert_specs(index)
        experts = sorted({e for e, _ in specs})
        out.append([max(spec.bits for (e, _), spec in specs.items() if e == expert) for expert in experts])
    return out


def compare_plan(
    model_path: str | Path,
    plan: BitPlan,
    calibration: torch.Tensor | str | Path | None = None,
    quantizer: str = "rtn",
    calib_tokens: int = 16384,
    seq_len: int = 256,
    gptq: CalibrationConfig | None = None,
) -> GuardReport:
    """Predicted damage of ``plan`` and of the compared strategies at the same budget.

    The budget is the plan's mean expert bits; ``uniform`` is at the largest whole width that
    fits it (marked when that is below the budget). Experts with projections at different widths
    are priced at their widest projection.
    """
    source = open_source(model_path)
    levels = tuple(sorted(set(AUTO_LEVELS) | {b for row in _widths(plan) for b in row}, reverse=True))
    described: dict = {}
    token_ids = _calibration_ids(source, calibration, calib_tokens, seq_len, described)
    wide = next((e.spec for e in plan.experts if e.spec.bits > 1), plan.experts[0].spec if plan.experts else None)
    scheme = "asym" if wide is None or wide.scheme.value == "sign" else wide.scheme.value
    group_size = wide.group_size if wide else None
    clip_search = wide.clip_search if wide else False

    def spec(bits: int, in_features: int | None = None):
        return _one_bit_aware_spec(bits, scheme, group_size, clip_search)

    table = _reusable_table(plan, levels, quantizer, int(token_ids.numel()))
    if table is None:
        change = router_signal(source, source.layers, None, {}, {})
        orders = [router_maxvar_order(c, v)[0] for c, v in zip(change, _maxvars(source.layers, "paper"))]
        positions = [[order.index(e) for e in range(len(order))] for order in orders]
        settings = gptq or CalibrationConfig()
        table = damage_table(source.lazy, token_ids, levels, spec, positions, quantizer,
                             options=settings.gptq_options, min_tokens=settings.min_tokens)
    budget = plan.budget["avg_expert_bits"]
    rows = [_row("chosen: " + plan.method.get("strategy", "plan"), plan, table)]
    common = AllocationConfig(scheme=scheme, group_size=group_size, clip_search=clip_search)
    counted: BitPlan | None = None  # the router-maxvar plan: frequency takes its level counts and bytes
    for strategy in COMPARED:
        try:
            if strategy == "uniform":
                whole = math.floor(budget + 1e-9)
                other = allocate(model_path, "uniform", avg_bits=whole, config=common)
                note = "" if whole == budget else f"{whole} bits (below budget)"
            elif strategy == "auto":
                other = allocate(model_path, "auto", avg_bits=budget, damage=table, config=replace(common, levels=levels))
                note = f"widths {','.join(map(str, levels))}"
            elif strategy == "frequency":
                rows.append(_frequency_row(table, budget, counted))
                continue
            else:
                other = counted = allocate(model_path, strategy, avg_bits=budget, config=common)
                note = "final-norm proxy" if uses_proxy(other) else ""
        except CountError as err:
            rows.append(GuardRow(strategy, budget, 0, math.nan, [], f"not possible: {err}"))
            continue
        rows.append(_row(strategy, other, table, note))
    used = f"{int(token_ids.numel()):,} tokens of {described['calibration']['source']}"
    return GuardReport(rows, quantizer, _verdict(rows), used)


def _reusable_table(plan: BitPlan, levels: tuple[int, ...], quantizer: str, tokens: int) -> DamageTable | None:
    """The damage table ``auto`` computed for ``plan`` when it covers the same widths, quantizer and
    calibration tokens: the guard then prices every plan from it instead of measuring again."""
    data = plan.scores.get("predicted_damage")
    calibration = plan.method.get("calibration") or {}
    if not data or tuple(data["widths"]) != levels or data["quantizer"] != quantizer:
        return None
    if calibration.get("sequences", 0) * calibration.get("sequence_length", 0) != tokens:
        return None
    return DamageTable.from_json(data)


def _frequency_row(table: DamageTable, budget: float, counted: BitPlan | None) -> GuardRow:
    """``frequency`` priced from the table: the tokens routed to each expert on this very walk are
    what that strategy ranks by (most first), and its count rules are router-maxvar's, so its bytes
    are too. No routing pass, no allocation run."""
    if counted is None:
        raise CountError("the count rules cannot meet this budget (see router-maxvar)")
    widths = [widths_from_order(descending_order([float(t) for t in tokens]), level_counts(budget, DEFAULT_LEVELS, len(tokens)))
              for tokens in table.tokens]
    layers = table.layer_totals(widths)
    return GuardRow("frequency", counted.budget["avg_expert_bits"], counted.budget["model_bytes"], sum(layers), layers)


def _row(name: str, plan: BitPlan, table: DamageTable, note: str = "") -> GuardRow:
    layers = table.layer_totals(_widths(plan))
    return GuardRow(name, plan.budget["avg_expert_bits"], plan.budget["model_bytes"], sum(layers), layers, note)


def _verdict(rows: list[GuardRow]) -> str:
    chosen = rows[0]
    others = [r for r in rows[1:] if not math.isnan(r.damage) and r.avg_bits <= chosen.avg_bits + 1e-9]
    if not others:
        return "no other plan fits this budget to compare with"
    best = min(others, key=lambda r: r.damage)
    if chosen.damage <= best.damage * 1.0001:
        return f"the chosen plan has the least predicted damage of the plans compared ({chosen.damage:.4g})"
    return (f"{best.strategy} is predicted to do {chosen.damage / best.damage:.1f}x less damage than the chosen plan "
            f"at the same budget ({best.damage:.4g} vs {chosen.damage:.4g})")
