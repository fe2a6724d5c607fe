"""moeq as a transformers quantization method: ``from_pretrained`` rebuilds the packed modules.

Registered through transformers' public hooks (``register_quantization_config`` and
``register_quantizer``) when ``moeq`` is imported. A saved folder's ``config.json`` carries
``quantization_config = {"quant_method": "moeq", "format_version": 1, "plan": <BitPlan JSON>}``;
before weights load, the quantizer swaps the planned modules for empty quantized ones of the
right sizes (on the meta device), and the packed tensors then load by name like any other
weight. No full-precision copy of the experts is ever built.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..plan import BitPlan

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "MoeqConfig", "MoeqHfQuantizer"]

QUANT_METHOD = "moeq"
FORMAT_VERSION = 1


@register_quantization_config(QUANT_METHOD)
class MoeqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a moeq checkpoint: a format version and the BitPlan."""

    def __init__(self, plan: dict[str, Any] | BitPlan, format_version: int = FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses moeq format {format_version}; this moeq reads format {FORMAT_VERSION}"
            )
        self.format_version = format_version
        self.plan = plan.to_json() if isinstance(plan, BitPlan) else plan

    def bit_plan(self) -> BitPlan:
        return BitPlan.from_json(self.plan)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "plan": self.plan}


@register_quantizer(QUANT_METHOD)
class MoeqHfQuantizer(HfQuantizer):
    """Loads moeq checkpoints (pre-quantized only; quantize with ``moeq.quantize``)."""

    requires_calibration = True  # from_pretrained cannot quantize on the fly; moeq.quantize does
    quantization_config: MoeqConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        # Before any weight is read: the plan must fit the model (checked before it is expanded),
        # and the files must hold exactly the tensors the plan implies (see moeq.io.verify).
        from pathlib import Path

        from ..modules.convert import plan_target, prepare_model
        from .verify import verify_checkpoint

        plan = BitPlan.from_json(self.quantization_config.plan, plan_target(model))
        prepare_model(model, plan)
        _untie_packed(model)
        if checkpoint_files:
            loaded_from = getattr(model.config, "_name_or_path", "") or ""
            verify_checkpoint(model, checkpoint_files, loaded_from if loaded_from and Path(loaded_from).is_dir() else None)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _untie_packed(model) -> None:
    """Drop tying entries for weights that are now packed (a quantized head tied to the embeddings).

    The packed head keeps its own codes; the config still says the weights are tied, because for
    some families (Switch, T5) that flag also changes the forward (a rescale before the head).
    """
    from ..modules.linear import QuantizedLinear

    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if any(isinstance(model.get_submodule(name.rpartition(".")[0]), QuantizedLinear) for name in (target, source)):
            tied.pop(target)
