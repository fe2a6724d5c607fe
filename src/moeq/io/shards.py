"""Which safetensors files hold a folder's weights, and what their headers claim, checked.

Every reader of a checkpoint folder (a source being quantized, a moeq checkpoint being loaded or
inspected) finds its tensors here, so one set of rules holds for all of them:

- a shard index may only name files inside the folder (no absolute paths, no ``..``), so a
  stranger's ``model.safetensors.index.json`` cannot make moeq read files elsewhere;
- a header is parsed by moeq itself (8-byte length, JSON) with a size limit, and every tensor's
  byte range must lie inside its file and match its dtype and shape, before any data is read;
- errors are :class:`~moeq.io.checkpoint.CheckpointError` naming the file and the fix.

Symbolic links placed inside the folder are followed (the Hugging Face cache stores shards that
way); the rules are about what a file's *contents* (the index, the headers) can make moeq do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError

__all__ = ["INDEX_FILE", "TensorHeader", "headers_of", "read_header", "shard_files", "weight_files", "inside_folder"]

INDEX_FILE = "model.safetensors.index.json"
# Headers of real checkpoints are a few hundred KiB (DeepSeek-V3's largest shard: ~120 KiB).
MAX_HEADER_BYTES = 64 * 2**20
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def inside_folder(folder: Path, name: str) -> Path:
    """``folder / name`` if ``name`` is a relative path that stays inside ``folder``, else an error."""
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or normal in ("", "."):
        raise CheckpointError(
            f"{folder / INDEX_FILE} names the shard {name!r}, which is outside the model folder; "
            "a shard index may only name files inside its folder: fix or remove the index"
        )
    return folder / normal


def read_header(file: Path) -> dict[str, TensorHeader]:
    """The tensors a safetensors file declares, checked against the file's real size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{file} is not a readable safetensors file (its header length is invalid); restore it")
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist; the folder's shard index names it: restore the file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}); restore it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a readable safetensors file (its header is not a JSON object); restore it")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= start <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{file}: the header entry of tensor {name} is malformed; restore the file")
        tensor = TensorHeader(dtype, shape)
        if end > data_bytes or end - start != tensor.nbytes:
            raise CheckpointError(
                f"{file}: tensor {name} claims {tensor.nbytes:,} bytes at offsets {start}-{end}, but the file holds "
                f"{data_bytes:,} bytes of data; the file is truncated or corrupt: restore it"
            )
        tensors[name] = tensor
    return tensors


def weight_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """The safetensors files of the model's weights: those the shard index names (checked to be
    inside ``folder``), else ``model*.safetensors``, else every ``*.safetensors`` not in ``exclude``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{index} is not a valid shard index ({err!r}); fix or remove it") from None
        if not all(isinstance(name, str) for name in names):
            raise CheckpointError(f"{index} is not a valid shard index (a shard name is not a string); fix or remove it")
        return [inside_folder(folder, name) for name in names]
    files = sorted(folder.glob("model*.safetensors")) or sorted(f for f in folder.glob("*.safetensors") if f.name not in exclude)
    return files


def shard_files(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, tuple[Path, TensorHeader]]:
    """``{tensor name: (file, header)}`` of a folder's weights; errors for a folder with none,
    a shard outside the folder, a malformed header or a tensor stored twice."""
    folder = Path(folder)
    files = weight_files(folder, exclude)
    if not files:
        pickles = [f.name for f in folder.glob("*.bin")] + [f.name for f in folder.glob("*.pt")] + [f.name for f in folder.glob("*.pth")]
        hint = (f"; it has {', '.join(sorted(pickles)[:3])}, a pickle format moeq does not read (pickles can run code): "
                "convert it to safetensors with the tool you trust") if pickles else ""
        raise CheckpointError(f"{folder} holds no safetensors weights{hint}")
    return headers_of(files)


def headers_of(files: list[Path]) -> dict[str, tuple[Path, TensorHeader]]:
    """``{tensor name: (file, header)}`` over ``files``; a tensor stored twice is an error."""
    found: dict[str, tuple[Path, TensorHeader]] = {}
    for file in files:
        for name, header in read_header(file).items():
            if name in found:
                raise CheckpointError(f"tensor {name} is stored in both {found[name][0].name} and {file.name}; remove one")
            found[name] = (file, header)
    return found
