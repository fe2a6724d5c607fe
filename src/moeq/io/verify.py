"""A moeq checkpoint's tensors checked against its plan before any weight is loaded.

transformers loads what a folder holds and only warns about what it lacks (a missing packed
tensor would stay uninitialised memory). So before ``from_pretrained`` reads a byte, every tensor
the plan implies must be in the folder's safetensors files with its exact shape (packed codes:
``ceil(out*in*bits/8)`` bytes, so a truncated, padded or other-width tensor is caught), packed
storage with its exact dtype, and no tensor the model does not have; then the (small) scales are
read and must be finite and positive, and zero points must lie below ``2^bits``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..quant.schemes import Scheme
from .checkpoint import CheckpointError
from .shards import DTYPE_BYTES, TensorHeader, headers_of, inside_folder

__all__ = ["verify_checkpoint"]

_SAFETENSORS_DTYPE = {
    torch.uint8: "U8", torch.int8: "I8", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}
_FLOAT_DTYPES = {name for name in DTYPE_BYTES if name.startswith(("F", "BF"))}


def _headers(folder: Path | None, files: list[str]) -> dict[str, tuple[Path, TensorHeader]]:
    if folder is not None:  # the index may name only files inside the folder
        for name in files:
            inside_folder(folder, os.path.relpath(os.path.abspath(name), os.path.abspath(folder)))
    return headers_of([Path(name) for name in files])


def _check(key: str, expected: torch.Tensor, file: Path, header: TensorHeader, packed: bool) -> None:
    if header.shape != tuple(expected.shape):
        raise CheckpointError(
            f"{file.name}: tensor {key} has shape {list(header.shape)}, the plan implies {list(expected.shape)}; "
            "the checkpoint is truncated, corrupt or does not match its config: re-export it"
        )
    want = _SAFETENSORS_DTYPE.get(expected.dtype)
    if packed or not expected.dtype.is_floating_point:
        ok = header.dtype == want
    else:  # full-precision weights may be stored in any float dtype; transformers casts them
        ok = header.dtype in _FLOAT_DTYPES
    if not ok:
        raise CheckpointError(f"{file.name}: tensor {key} is {header.dtype}, the plan implies {want}; re-export the checkpoint")


def verify_checkpoint(model: nn.Module, files: list[str], folder: str | Path | None = None) -> None:
    """Refuse, in one line naming the tensor, a moeq checkpoint whose ``files`` do not hold exactly
    what ``model`` (a meta skeleton with its quantized modules in place) expects.

    ``folder``: the checkpoint folder every file must lie inside (``None``: not checked).
    """
    from ..modules.linear import QuantizedLinear

    folder = Path(folder) if folder is not None else None
    stored = _headers(folder, list(files))
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    packed = {
        f"{name}.{buffer}": module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)
        for buffer in QuantizedLinear.TENSOR_NAMES if getattr(module, buffer) is not None
    }
    expected = model.state_dict(keep_vars=True)
    for key, tensor in expected.items():
        if key not in stored:
            if key in tied:
                continue  # stored once, under the name it is tied to
            raise CheckpointError(f"the checkpoint lacks tensor {key}; it is incomplete: re-export it")
        _check(key, tensor, *stored[key], packed=key in packed)
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{stored[extra[0]][0].name} holds tensor {extra[0]}, which this model does not have; re-export the checkpoint")
    _check_values(packed, stored)


def _check_values(packed: dict[str, nn.Module], stored: dict[str, tuple[Path, TensorHeader]]) -> None:
    by_file: dict[Path, list[str]] = {}
    for key, module in packed.items():
        if key.endswith((".scales", ".zeros")) or (key.endswith(".codes") and module.spec.scheme.is_kquant):
            by_file.setdefault(stored[key][0], []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            for key in keys:
                values = handle.get_tensor(key)
                if key.endswith(".codes"):  # K-quant blocks carry their float16 super-block scales inside
                    _check_kquant_scales(file, key, packed[key], values)
                    continue
                # symx alone stores signed scales (llama.cpp's Q4_0/Q5_0 rule); none may be zero
                signed = packed[key].spec.scheme is Scheme.SYMX
                if key.endswith(".scales") and not (torch.isfinite(values).all() and ((values != 0) if signed else (values > 0)).all()):
                    raise CheckpointError(f"{file.name}: tensor {key} holds non-finite or non-positive scales; the checkpoint is corrupt: re-export it")
                bits = packed[key].spec.bits
                if key.endswith(".zeros") and values.is_floating_point():  # affine's float16 minima
                    if not torch.isfinite(values).all():
                        raise CheckpointError(f"{file.name}: tensor {key} holds non-finite minima; the checkpoint is corrupt: re-export it")
                elif key.endswith(".zeros") and values.numel() and int(values.max()) >= 2**bits:
                    raise CheckpointError(f"{file.name}: tensor {key} holds zero points of {int(values.max())}, beyond {bits} bits; the checkpoint is corrupt: re-export it")


def _check_kquant_scales(file: Path, key: str, module: nn.Module, blocks: torch.Tensor) -> None:
    from ..quant.kquants import super_block_scales
    from ..quant.schemes import kquant_of

    if not torch.isfinite(super_block_scales(blocks, kquant_of(module.spec.scheme))).all():
        raise CheckpointError(f"{file.name}: tensor {key} holds non-finite super-block scales; the checkpoint is corrupt: re-export it")
