"""Saving and loading quantized models as Hugging Face style folders.

A saved folder holds ``config.json`` (with the moeq ``quantization_config``: format version and
BitPlan), ``model.safetensors`` whose tensor names are the model's own module paths (packed
experts read ``<layer>.experts.<e>.<projection>.codes|scales|zeros``), the generation config,
and the tokenizer files copied from the source checkpoint when it has them. It is written into
a temporary sibling folder and renamed into place only when complete.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..plan import BitPlan, PlanTarget
from ..atomic import atomic_directory
from .hf import QUANT_METHOD, MoeqConfig

__all__ = ["save", "load", "read_plan", "moeq_quantization_config", "CheckpointError", "TOKENIZER_FILES"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A folder that is not a (readable) moeq checkpoint."""


def _deduplicated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name wins; loading re-ties them)."""
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def save(model: nn.Module, out: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a quantized ``model`` to the folder ``out``.

    Args:
        model: a model returned by :func:`moeq.quantize` (or :func:`load`).
        out: the output folder; refused if it exists, unless ``overwrite``.
        source: the original checkpoint folder, to copy tokenizer files from (default: the folder
            the model was loaded from, when that is a local folder).
        overwrite: replace an existing ``out`` (only once the new folder is complete).
    """
    quant = getattr(model.config, "quantization_config", None)
    if not isinstance(quant, MoeqConfig):
        raise CheckpointError("this model is not quantized by moeq; call moeq.quantize(model, ...) first")
    out = Path(out)
    loaded_from = getattr(model.config, "_name_or_path", "") or ""
    source = Path(source) if source else (Path(loaded_from) if loaded_from else None)
    inputs = [source] if source is not None and source.exists() else []
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as work:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = next(model.parameters()).dtype
        config.save_pretrained(work)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(work)
        save_file(_deduplicated_state_dict(model), work / "model.safetensors", metadata={"format": "pt"})
        if source is not None and source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, work / name)
    return out


def moeq_quantization_config(path: str | Path) -> dict:
    """The ``quantization_config`` of a moeq checkpoint's ``config.json``; errors for other folders."""
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json; is it a model folder?") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a moeq checkpoint (no quantization_config with quant_method 'moeq')")
    return quant


def read_plan(path: str | Path, target: PlanTarget | None = None) -> BitPlan:
    """The BitPlan stored in a moeq checkpoint's ``config.json``, without loading any weights;
    with ``target`` (what the model offers) it is refused before expansion unless it fits."""
    quant = moeq_quantization_config(path)
    config = MoeqConfig(**{k: v for k, v in quant.items() if k != "quant_method"})
    return BitPlan.from_json(config.plan, target)


def load(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> nn.Module:
    """Load a moeq checkpoint with transformers, packed modules rebuilt, in eval mode; its experts
    run on ``backend`` (:data:`moeq.kernels.BACKENDS`; ``cpu-int4`` trades memory for CPU speed)."""
    from transformers import AutoConfig

    from ..models import auto_model_class

    from ..kernels.dispatch import check_backend
    from ..modules.experts import use_backend

    check_backend(backend)
    moeq_quantization_config(path)  # a clear error for folders that are not moeq checkpoints
    config = AutoConfig.from_pretrained(path)
    auto = auto_model_class(config)
    model = auto.from_pretrained(path).to(device).eval()
    use_backend(model, backend)
    return model
