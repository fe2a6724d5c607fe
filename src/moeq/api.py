"""The public verbs: quantize a model in memory, or a checkpoint folder into another, by a
QuantConfig or a BitPlan."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .allocate import AllocationConfig, allocate
from .allocate.guard import GuardReport, compare_plan, uses_proxy
from .calibrate.runner import CalibrationConfig, CalibrationReport
from .config import QuantConfig, uniform_plan
from .executors import Executor
from .io.hf import MoeqConfig
from .modules.convert import quantize_model
from .plan import BitPlan

__all__ = ["quantize", "quantize_checkpoint", "plan_checkpoint", "choose_plan", "check_calibration_file", "check_quantizer", "plan_for",
           "CheckpointResult", "PlanResult"]


@dataclass
class CheckpointResult:
    """What :func:`quantize_checkpoint` wrote: the folder, the plan it followed (as saved, with the
    calibration recorded for GPTQ) and, for GPTQ, the tokens and method each expert got."""

    out: Path
    plan: BitPlan
    report: CalibrationReport | None = None


@dataclass
class PlanResult:
    """What :func:`plan_checkpoint` made: the plan, whether it ranked experts by the final-norm
    proxy, and the guard's comparison (``None`` when not run; ``guard_skipped`` then says why, when
    the guard was asked for but could not run)."""

    plan: BitPlan
    proxy: bool
    guard: GuardReport | None = None
    guard_skipped: str | None = None


def plan_checkpoint(
    model_path: str | Path,
    config: AllocationConfig,
    *,
    avg_bits: float | None = None,
    max_bytes: int | None = None,
    reference: str | Path | None = None,
    calibration: torch.Tensor | str | Path | None = None,
    guard: bool = True,
    on_plan: Callable[[BitPlan, float], None] | None = None,
    executor: Executor | None = None,
) -> PlanResult:
    """Allocate a plan for the checkpoint folder ``model_path`` (:func:`moeq.allocate`) and, when
    calibration text is given and ``guard`` is set, price it beside the compared strategies on the
    same calibration slice (:func:`moeq.allocate.guard.compare_plan`). Data-free strategies without
    ``calibration`` read no text and run no guard. The guard informs and never fails the plan.
    ``on_plan(plan, seconds)`` is called as soon as the plan exists (before the guard), e.g. to save it;
    ``executor`` runs ``auto``'s damage jobs."""
    if (avg_bits is None) == (max_bytes is None):
        raise ValueError("give exactly one budget: --avg-bits, or --max-bytes / --max-gb")
    started = time.perf_counter()
    plan = allocate(model_path, avg_bits=avg_bits, max_bytes=max_bytes, reference=reference, calibration=calibration, config=config,
                    executor=executor)
    if on_plan is not None:
        on_plan(plan, time.perf_counter() - started)
    result = PlanResult(plan, uses_proxy(plan))
    if not guard or calibration is None or not plan.experts:  # data-free stays data-free: no text, no guard
        return result
    target = (plan.method.get("target") or {}).get("name", "moeq")
    if target != "moeq":
        result.guard_skipped = (f"compares plans for moeq's own runtime; not run for --target {target} "
                                "(the plan's budget shows the predicted damage beside a width per expert)")
        return result
    try:
        result.guard = compare_plan(model_path, plan, calibration, config.damage_quantizer, config.calib_tokens, config.seq_len,
                                    config.gptq)
    except (ValueError, OSError) as err:
        result.guard_skipped = str(err).splitlines()[0]
    return result


def choose_plan(
    model_path: str | Path,
    allocation: AllocationConfig,
    *,
    uniform: QuantConfig | None = None,
    plan_path: str | Path | None = None,
    avg_bits: float | None = None,
    max_bytes: int | None = None,
    reference: str | Path | None = None,
    calibration: torch.Tensor | str | Path | None = None,
    guard: bool = True,
    executor: Executor | None = None,
) -> tuple[BitPlan | QuantConfig, PlanResult | None]:
    """What ``moeq quantize`` quantizes ``model_path`` by, from exactly one of: ``uniform`` (every
    expert at its bits; for a target with fixed types, that width's type: a uniform plan),
    ``plan_path`` (a saved plan, checked against the model and ``allocation.target``), or a budget
    (``avg_bits`` / ``max_bytes``: :func:`plan_checkpoint` with ``allocation``, the guard beside it).
    Returns it and, when a plan was allocated, the :class:`PlanResult` to show."""
    from .io.lazy import open_lazy
    from .io.source import plan_target_of
    from .targets import get_target

    budgets = [b for b in (avg_bits, max_bytes) if b is not None]
    if sum([uniform is not None, plan_path is not None, bool(budgets)]) != 1 or len(budgets) > 1:
        raise ValueError("give exactly one of --bits B, --plan PLAN.json, or one budget (--avg-bits or --max-gb) with --strategy")
    runtime = get_target(allocation.target)
    if plan_path is not None:
        plan = BitPlan.load(plan_path, plan_target_of(model_path))
        runtime.check_plan(plan, [layer.shapes for layer in open_lazy(model_path).layers])
        return plan, None
    if uniform is not None and runtime.free:
        return uniform, None
    if uniform is not None:  # --bits B --target T: every tensor at T's B-bit type
        return plan_checkpoint(model_path, replace(allocation, strategy="uniform", levels=None), avg_bits=float(uniform.bits),
                               executor=executor).plan, None
    planned = plan_checkpoint(model_path, allocation, avg_bits=avg_bits, max_bytes=max_bytes, reference=reference,
                              calibration=calibration, guard=guard, executor=executor)
    return planned.plan, planned


def plan_for(model: nn.Module, config: QuantConfig | BitPlan) -> BitPlan:
    """The BitPlan a config stands for (a BitPlan is returned as is)."""
    return config if isinstance(config, BitPlan) else uniform_plan(model, config)


def quantize(model: nn.Module, config: QuantConfig | BitPlan, progress=None) -> nn.Module:
    """Quantize ``model`` in place by ``config`` (uniform widths) or an explicit ``BitPlan``.

    Routed experts are quantized as planned; other linears only where the plan names them. The
    model's config gains the moeq ``quantization_config``, so :func:`moeq.save` can write it and
    ``from_pretrained`` can load it back.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("this model is already quantized; start from the full-precision checkpoint")
    plan = plan_for(model, config)
    quantize_model(model, plan, progress=progress)
    model.config.quantization_config = MoeqConfig(plan)
    return model


def check_calibration_file(calibration: torch.Tensor | str | Path | None) -> None:
    """Refuse calibration text named by a path that does not exist (before any pass over the model)."""
    from .calibrate.routing import is_default_corpus

    if isinstance(calibration, (str, Path)) and not is_default_corpus(calibration) and not Path(calibration).is_file():
        raise FileNotFoundError(f"calibration text {calibration} does not exist; pass an existing file with --calib (or --calib default)")


def check_quantizer(quantizer: str, calibration: torch.Tensor | str | Path | None) -> None:
    """Refuse an unknown quantizer, GPTQ without calibration text, or missing text: checked
    before any pass over the model."""
    if quantizer not in ("rtn", "gptq"):
        raise ValueError(f"unknown quantizer {quantizer!r}; choose rtn or gptq")
    if quantizer == "gptq" and calibration is None:
        raise ValueError("--quantizer gptq needs calibration text: pass --calib FILE (or --calib default for moeq's corpus)")
    check_calibration_file(calibration)


def quantize_checkpoint(
    model_path: str | Path,
    out: str | Path,
    config: QuantConfig | BitPlan,
    *,
    quantizer: str = "rtn",
    calibration: torch.Tensor | str | Path | None = None,
    calibration_config: CalibrationConfig | None = None,
    calib_tokens: int = 131072,
    seq_len: int = 2048,
    overwrite: bool = False,
    resume: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> CheckpointResult:
    """Quantize the checkpoint folder ``model_path`` into ``out``, one block at a time (models
    larger than memory), resumable with ``resume``.

    Args:
        config: uniform widths, or an explicit :class:`BitPlan` (e.g. from :func:`moeq.allocate`).
        quantizer: ``rtn`` (round to nearest, no data) or ``gptq`` (needs ``calibration``: token
            ids ``[sequences, length]``, a text file, or ``"default"`` for moeq's corpus, cut to
            ``calib_tokens`` tokens in sequences of ``seq_len``).
        calibration_config: GPTQ's settings (token minimum, rare-expert fallback, damping...).
        seed: recorded in a plan made from ``config``.
        progress: called with each block's path as it is done (or found done).
        executor: where the jobs run (:mod:`moeq.executors`: serial by default, a local process
            pool, Ray); the output's bytes are the same whichever runs them.
    """
    from .calibrate.routing import tokenize_calibration
    from .calibrate.runner import quantize_calibrated
    from .io.source import meta_skeleton, require_full_precision
    from .io.streaming import quantize_checkpoint as quantize_streaming

    check_quantizer(quantizer, calibration)
    require_full_precision(model_path)
    if isinstance(config, BitPlan):
        plan = config
    else:
        plan = uniform_plan(meta_skeleton(model_path), config)
        plan.method["seed"] = seed
    if quantizer == "rtn":
        quantize_streaming(model_path, plan, out, overwrite=overwrite, resume=resume, progress=progress, executor=executor)
        return CheckpointResult(Path(out), plan)
    token_ids = calibration if isinstance(calibration, torch.Tensor) else tokenize_calibration(model_path, calibration, calib_tokens, seq_len)
    report = quantize_calibrated(
        model_path, plan, token_ids, out, calibration_config or CalibrationConfig(), overwrite=overwrite, progress=progress, resume=resume,
        executor=executor,
    )
    from .io.checkpoint import read_plan

    return CheckpointResult(Path(out), read_plan(out), report)
