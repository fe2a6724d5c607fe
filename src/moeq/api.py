"""The public verbs: quantize a model in memory by a QuantConfig or a BitPlan."""

from __future__ import annotations

from torch import nn

from .config import QuantConfig, uniform_plan
from .io.hf import MoeqConfig
from .modules.convert import quantize_model
from .plan import BitPlan

__all__ = ["quantize", "plan_for"]


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
