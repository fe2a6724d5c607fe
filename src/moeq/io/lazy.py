"""Reading a checkpoint lazily: one tensor (or one expert's slice of a fused tensor) at a time.

``open_lazy(folder)`` builds the model's skeleton on the meta device (no weights), asks the
adapter for its MoE layers, and rebinds each layer's ``expert_weight`` to read from the
safetensors shards on demand through memory maps. Routers are read eagerly (they are tiny).
The reader counts the bytes it returns, so a caller can say how much of the checkpoint a
computation needed. Files are memory-mapped only for the duration of one read, so the process's
resident memory stays at the size of the tensors it holds, not of the pages it has read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models import MoEAdapter, MoELayer, moe_layers_or_error
from ..models.base import TensorSource
from .checkpoint import CheckpointError
from ..files import INITIAL_ROUTER_FILE
from .shards import shard_files
from .source import meta_skeleton, read_config, source_quantization

__all__ = ["LazyCheckpoint", "LazyModel", "open_lazy"]


class LazyCheckpoint:
    """Tensors of a safetensors checkpoint folder (single file or sharded), read on demand.

    Every read is checked first against the shard's header: the tensor must exist and, when the
    caller says what shape the model expects, have it, so a mis-shaped or oversized tensor is
    refused before its bytes are read.
    """

    def __init__(self, folder: str | Path, fp8_block: tuple[int, int] | None = None) -> None:
        self.folder = Path(folder)
        self.bytes_read = 0
        self.fp8_block = fp8_block  # a block-scaled FP8 source's weight_block_size: its weights are dequantized on read
        # Only the model's weights: a folder may also hold other safetensors files (such as the
        # initial routers a trained checkpoint ships for the router-norm change).
        self._tensors = shard_files(self.folder, exclude=(INITIAL_ROUTER_FILE,))

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape_of(self, source: TensorSource) -> tuple[int, ...]:
        """The shape ``read(source)`` returns, from the header alone."""
        file, header = self._tensors[source.key]
        try:
            shape = tuple(torch.empty(header.shape, device="meta")[source.index].shape) if source.index else tuple(header.shape)
            return (*shape[:-2], shape[-1], shape[-2]) if source.transposed else shape
        except IndexError:
            raise CheckpointError(
                f"tensor {source.key} in {file.name} has shape {list(header.shape)}, too small for the part "
                f"{source.index} the model's config implies; the checkpoint does not match its config.json"
            ) from None

    def check(self, source: TensorSource, expected: tuple[int, ...] | None) -> None:
        """Refuse ``source`` unless its header promises the ``expected`` shape (None: any)."""
        shape = self.shape_of(source)
        if expected is not None and shape != tuple(expected):
            part = f" (part {source.index})" if source.index else ""
            raise CheckpointError(
                f"tensor {source.key}{part} in {self._tensors[source.key][0].name} has shape {list(shape)}, but the "
                f"model's config.json implies {list(expected)}; the checkpoint does not match its config: fix or re-export it"
            )

    def read(self, source: TensorSource, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor (or the indexed part of it) at ``source``, checked against ``expected``; an
        FP8 weight comes back dequantized by its block scales (:mod:`moeq.quant.sources`)."""
        self.check(source, expected)
        file, header = self._tensors[source.key]
        tensor = self._read_fp8(source, file) if header.dtype.startswith("F8_") else self._read_raw(source, file)
        return tensor.transpose(-1, -2).contiguous() if source.transposed else tensor

    def _read_fp8(self, source: TensorSource, file: Path) -> torch.Tensor:
        from ..quant.sources import dequantize_fp8_blocks

        key = source.key
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else None
        if self.fp8_block is None or scale_key not in self._tensors:
            raise CheckpointError(
                f"tensor {key} in {file.name} is float8 without block scales (a {scale_key or key + '_scale_inv'} tensor and "
                "quantization_config.weight_block_size in config.json); moeq reads FP8 checkpoints in DeepSeek-V3's block-scaled layout"
            )
        if len(self._tensors[key][1].shape) != 2:
            raise CheckpointError(f"tensor {key} in {file.name} is a {len(self._tensors[key][1].shape)}-D float8 tensor; "
                                  "moeq reads block-scaled FP8 weights stored one 2-D matrix per tensor")
        weight = self._read_raw(TensorSource(key), file)
        scales = self._read_raw(TensorSource(scale_key), self._tensors[scale_key][0])
        try:
            dense = dequantize_fp8_blocks(weight, scales, self.fp8_block, name=f"tensor {key} in {file.name}")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return dense[source.index] if source.index else dense

    def _read_raw(self, source: TensorSource, file: Path) -> torch.Tensor:
        try:
            # Opened per read and closed after it: a long-lived memory map would keep every page
            # read so far resident in this process, and its memory would grow with the checkpoint.
            with safe_open(str(file), framework="pt") as handle:
                piece = handle.get_slice(source.key)
                tensor = piece[source.index] if source.index else piece[:]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"could not read tensor {source.key} from {file} ({err}); the file is missing, truncated or corrupt: restore it"
            ) from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def first_present(self, sources: list[TensorSource], what: str) -> TensorSource:
        """The first of ``sources`` present in the checkpoint; an error lists them all if none is."""
        for source in sources:
            if source.key in self:
                return source
        names = ", ".join(sorted({s.key for s in sources}))
        raise CheckpointError(f"{self.folder} has no tensor for {what} (looked for {names})")

    def read_first(self, sources: list[TensorSource], what: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """The first of ``sources`` present in the checkpoint, checked against ``expected``."""
        return self.read(self.first_present(sources, what), expected)


@dataclasses.dataclass
class LazyModel:
    """A checkpoint opened without loading it: config, meta skeleton, adapter and lazy MoE layers."""

    folder: Path
    config: object
    skeleton: nn.Module
    adapter: MoEAdapter
    layers: list[MoELayer]
    reader: LazyCheckpoint

    def _tensor_source(self, name: str) -> TensorSource:
        sources = self.adapter.tensor_sources(name)
        tied = (getattr(self.skeleton, "all_tied_weights_keys", None) or {}).get(name)
        if tied:
            sources += self.adapter.tensor_sources(tied)
        return self.reader.first_present(sources, name)

    def _expected_shape(self, name: str) -> tuple[int, ...]:
        module, _, leaf = name.rpartition(".")
        return tuple(getattr(self.skeleton.get_submodule(module), leaf).shape)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A non-expert tensor by its module path (or the on-disk spellings, or its tied source),
        refused unless it has the shape the model's config implies."""
        return self.reader.read(self._tensor_source(name), self._expected_shape(name))

    def check_tensors(self) -> None:
        """Every tensor the model needs is present with the shape its config implies; headers only,
        so a quantization run refuses a bad checkpoint before it starts, not hours into it."""
        experts = tuple(layer.experts_path + "." for layer in self.layers)
        for name in self.skeleton.state_dict(keep_vars=True):
            if not name.startswith(experts):
                self.reader.check(self._tensor_source(name), self._expected_shape(name))
        for layer in self.layers:
            for expert in range(layer.num_experts):
                for projection in layer.projections:
                    what = f"expert {expert} {projection} of {layer.path}"
                    source = self.reader.first_present(self.adapter.expert_sources(layer, expert, projection), what)
                    self.reader.check(source, layer.shapes[projection])

    @torch.no_grad()
    def materialize(self, path: str) -> nn.Module:
        """Give the skeleton's module at ``path`` real CPU tensors read from the checkpoint.

        Routed experts inside it are filled through the adapter (either on-disk layout); every
        other parameter and persistent buffer is read by name. Call :meth:`release` when done.
        """
        module = self.skeleton.get_submodule(path)
        for sub_name, sub in module.named_modules():
            if sub._non_persistent_buffers_set:
                full = f"{path}.{sub_name}".rstrip(".")
                raise CheckpointError(f"{full} has computed buffers; materializing it from the checkpoint is not supported")
        module.to_empty(device="cpu")
        experts_paths = {layer.experts_path: layer for layer in self.layers}
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"{path}.{name}"
            owner = next((p for p in experts_paths if key.startswith(p + ".")), None)
            if owner is not None:
                continue
            tensor.data.copy_(self.read_tensor(key))
        for experts_path, layer in experts_paths.items():
            if experts_path == path or experts_path.startswith(path + "."):
                self.adapter.fill_experts(self.skeleton.get_submodule(experts_path), layer)
        return module

    def release(self, path: str) -> None:
        """Return the module at ``path`` to the meta device, freeing its memory."""
        self.skeleton.get_submodule(path).to_empty(device="meta")
        self._retie()

    def _retie(self) -> None:
        # to_empty gives a module new parameter objects, which unties weights shared with other
        # modules (an input embedding and a tied output head): tie them again.
        if getattr(self.skeleton.config, "tie_word_embeddings", False) and hasattr(self.skeleton, "tie_weights"):
            self.skeleton.tie_weights()


def open_lazy(folder: str | Path) -> LazyModel:
    """Open the checkpoint at ``folder`` for lazy reading of its routers and experts."""
    from ..models import get_adapter

    raw = read_config(folder)
    get_adapter(raw.get("model_type"))
    skeleton = meta_skeleton(folder)
    config = skeleton.config
    adapter, meta_layers = moe_layers_or_error(skeleton)
    stored = source_quantization(raw, folder)
    reader = LazyCheckpoint(folder, tuple(stored["weight_block_size"]) if stored else None)
    layers = []
    for layer in meta_layers:
        router = reader.read_first(adapter.router_sources(layer), f"the router of {layer.path}", tuple(layer.router_weight.shape))

        def expert_weight(expert: int, projection: str, layer: MoELayer = layer) -> torch.Tensor:
            sources = adapter.expert_sources(layer, expert, projection)
            return reader.read_first(sources, f"expert {expert} {projection} of {layer.path}", layer.shapes[projection])

        layers.append(dataclasses.replace(layer, router_weight=router, expert_weight=expert_weight))
    return LazyModel(Path(folder), config, skeleton, adapter, layers, reader)
