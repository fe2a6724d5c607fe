"""Opening a source checkpoint: clear errors before any weight is read.

The model type is checked against the adapters from ``config.json`` alone, so an unsupported
or non-MoE model fails in milliseconds, not after loading gigabytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..models import auto_model_class, get_adapter, moe_layers_or_error
from ..plan import PlanTarget
from .checkpoint import CheckpointError

__all__ = ["load_any", "load_source", "meta_skeleton", "read_config", "require_full_precision", "plan_target_of"]


def read_config(path: str | Path) -> dict:
    """``config.json`` of a model folder as a dict; errors name the folder and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass the folder that holds config.json")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; point MODEL at a Hugging Face model folder")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from None


def source_quantization(raw: dict, path: str | Path = "the checkpoint") -> dict | None:
    """How a source checkpoint's own weights are stored, when not in plain floats: block-scaled FP8
    (``quant_method`` ``fp8`` with ``weight_block_size``, DeepSeek-V3's layout) or MXFP4 experts
    (``mxfp4``, gpt-oss's ``*_blocks``/``*_scales``), which moeq reads by dequantizing each weight as
    it is read (``None``: plain floats). Any other format is refused."""
    quantization = raw.get("quantization_config") or {}
    method = quantization.get("quant_method")
    if not method:
        return None
    block = quantization.get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return {"quant_method": "fp8", "fmt": quantization.get("fmt", "e4m3"), "weight_block_size": list(block),
                "read_as": "each weight dequantized on read: float8 x its block's weight_scale_inv in float32, to bfloat16"}
    if method == "mxfp4":
        return {"quant_method": "mxfp4",
                "read_as": "each X_blocks/X_scales pair dequantized on read: E2M1 codes x 2^(scale - 127), to bfloat16"}
    if method == "fp8":
        raise CheckpointError(f"{path} is FP8 without a weight_block_size of two positive integers in its quantization_config; "
                              "moeq reads block-scaled FP8 (DeepSeek-V3's layout)")
    raise CheckpointError(f"{path} is already quantized ({method}); start from the full-precision model (or its block-scaled FP8 "
                          "or MXFP4 release)")


def require_full_precision(path: str | Path) -> dict:
    """The config of a supported MoE checkpoint moeq can quantize: full precision, or block-scaled
    FP8 read as floats; errors name what is wrong."""
    raw = read_config(path)
    source_quantization(raw, path)
    get_adapter(raw.get("model_type"))
    return raw


def meta_skeleton(path: str | Path) -> nn.Module:
    """The model a folder's ``config.json`` describes, on the meta device (no weights, no
    quantized modules), in eval mode: shapes and module paths for checks made before any read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None
    auto = auto_model_class(config)
    with torch.device("meta"):
        return auto.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32).eval()


def plan_target_of(path: str | Path) -> PlanTarget:
    """What the model at ``path`` offers a plan (from its config alone), to check plans against."""
    from ..modules.convert import plan_target

    raw = read_config(path)
    get_adapter(raw.get("model_type"))
    return plan_target(meta_skeleton(path))


def load_source(path: str | Path) -> nn.Module:
    """Load a full-precision MoE checkpoint (in its stored dtype) for quantization, in eval mode; a
    source stored as block-scaled FP8 or MXFP4 comes back dequantized (bfloat16 weights)."""
    from transformers import AutoConfig

    from .lazy import open_lazy

    raw = require_full_precision(path)
    # Before transformers reads anything: the shard index stays inside the folder, headers are
    # sound, no pickle-only folder, and every tensor has the shape the config implies.
    lazy = open_lazy(path)
    lazy.check_tensors()
    if source_quantization(raw, path):
        return _dequantized(lazy)
    config = AutoConfig.from_pretrained(path)
    auto = auto_model_class(config)
    try:
        model = auto.from_pretrained(path, config=config)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"could not read the weights of {path}: {first_line}") from None
    moe_layers_or_error(model)
    return model.eval()


@torch.no_grad()
def _dequantized(lazy) -> nn.Module:
    """The model of a source stored quantized, every tensor read (dequantized) by moeq's own lazy
    reader: the same floats quantizing it streams, one tensor at a time."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = auto_model_class(lazy.config).from_config(lazy.config, dtype=next(lazy.skeleton.parameters()).dtype)
    experts = tuple(layer.experts_path + "." for layer in lazy.layers)
    for name, tensor in model.state_dict().items():
        if not name.startswith(experts):
            tensor.copy_(lazy.read_tensor(name))
    for layer in lazy.layers:
        lazy.adapter.fill_experts(model.get_submodule(layer.experts_path), layer)
    moe_layers_or_error(model)
    return model.eval()


def load_any(path: str | Path, backend: str = "auto") -> nn.Module:
    """A model folder, quantized by moeq or not, loaded for inference (eval mode); ``backend`` runs
    a moeq checkpoint's experts (:data:`moeq.kernels.BACKENDS`)."""
    from ..kernels.dispatch import check_backend

    check_backend(backend)  # refused even for a model without quantized experts: a typo should not pass
    raw = read_config(path)
    if (raw.get("quantization_config") or {}).get("quant_method") == "moeq":
        from .checkpoint import load

        return load(path, backend=backend)
    return load_source(path)
